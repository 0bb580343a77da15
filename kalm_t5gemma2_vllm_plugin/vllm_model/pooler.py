# SPDX-License-Identifier: Apache-2.0
"""The pooler that runs KaLM's decoder and emits the yes−no margin per request."""

from __future__ import annotations

from collections.abc import Set
from typing import TYPE_CHECKING

import torch
from vllm.model_executor.layers.pooler import Pooler, PoolingParamsUpdate
from vllm.tasks import PoolingTask
from vllm.v1.pool.metadata import PoolingMetadata

from kalm_t5gemma2_vllm_plugin.counters import EngineCounters
from kalm_t5gemma2_vllm_plugin.t5gemma2 import score_requests
from kalm_t5gemma2_vllm_plugin.vllm_model.processor import leading_placeholders

if TYPE_CHECKING:
    from transformers.models.t5gemma2.modeling_t5gemma2 import T5Gemma2Decoder

__all__ = ["KaLMYesNoPooler"]


class KaLMYesNoPooler(Pooler):
    """Splits each request into passage rows and decoder ids, scores all at once.

    vLLM hands the pooler the rows of every request of the step: the leading
    placeholder rows hold the pooled passage states (scattered there by the
    model's ``embed_input_ids``), the rest are decoder positions whose ids come
    from the prompt. One batched pass of the decoder it owns scores them all.
    """

    def __init__(
        self, decoder: T5Gemma2Decoder, softcap: float | None, counters: EngineCounters
    ) -> None:
        super().__init__()
        self.decoder = decoder
        self.softcap = softcap
        self.counters = counters

    def get_supported_tasks(self) -> Set[PoolingTask]:
        return {"classify"}

    def get_pooling_updates(self, task: PoolingTask) -> PoolingParamsUpdate:
        return PoolingParamsUpdate(requires_token_ids=True)

    def forward(
        self, hidden_states: torch.Tensor, pooling_metadata: PoolingMetadata
    ) -> list[torch.Tensor]:
        cursor = pooling_metadata.get_pooling_cursor()
        firsts = cursor.first_token_indices_gpu.tolist()
        passages, prompts = [], []
        for ids, first in zip(
            pooling_metadata.get_prompt_token_ids_cpu(), firsts, strict=True
        ):
            num_rows = leading_placeholders(ids)
            passages.append(hidden_states[first : first + num_rows])
            prompts.append(ids[num_rows:])
        self.counters.add(requests_scored=len(prompts))
        margins = score_requests(self.decoder, passages, prompts, self.softcap)  # [B]
        scores = torch.sigmoid(margins)
        return [
            (margins if params.use_activation is False else scores)[i : i + 1]
            for i, params in enumerate(pooling_metadata.pooling_params)
        ]

    def extra_repr(self) -> str:
        return f"softcap={self.softcap}"
