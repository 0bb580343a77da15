# SPDX-License-Identifier: Apache-2.0
"""The pooler that runs KaLM's decoder and emits the yes−no margin per request."""

from __future__ import annotations

from collections.abc import Callable, Set

import torch
from vllm.model_executor.layers.pooler import Pooler, PoolingParamsUpdate
from vllm.v1.pool.metadata import PoolingMetadata

from .constants import PLACEHOLDER_TOKEN_ID

__all__ = ["KaLMYesNoPooler", "MarginFn"]

#: ``(passage states per request, decoder ids per request) -> margins [B] fp32``
MarginFn = Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor]


class KaLMYesNoPooler(Pooler):
    """Splits each request into passage rows and decoder ids, scores all at once.

    vLLM hands the pooler the rows of every request of the step: the leading
    placeholder rows hold the pooled passage states (scattered there by
    ``embed_input_ids``), the rest are decoder positions whose ids come from
    the prompt. One batched decoder pass (``margin_fn``) scores them all.
    """

    def __init__(self, margin_fn: MarginFn) -> None:
        super().__init__()
        self._margin_fn = margin_fn

    def get_supported_tasks(self) -> Set[str]:  # type: ignore[override]
        return {"classify"}

    def get_pooling_updates(self, task: str) -> PoolingParamsUpdate:  # type: ignore[override]
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
            num_rows = _leading_placeholders(ids)
            passages.append(hidden_states[first : first + num_rows])
            prompts.append(ids[num_rows:])
        margins = self._margin_fn(passages, prompts)  # [B] float32
        scores = torch.sigmoid(margins)
        return [
            (margins if params.use_activation is False else scores)[i : i + 1]
            for i, params in enumerate(pooling_metadata.pooling_params)
        ]


def _leading_placeholders(ids: torch.Tensor) -> int:
    """Length of the run of placeholder ids that starts the prompt."""
    others = (ids != PLACEHOLDER_TOKEN_ID).nonzero()
    return int(others[0]) if len(others) else len(ids)
