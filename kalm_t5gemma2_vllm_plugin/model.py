# SPDX-License-Identifier: Apache-2.0
"""KaLM-Reranker-V1 as a vLLM pooling model (decoder-only view, "passage" modality).

vLLM has no encoder-decoder pooling support, so the model presents itself as a
decoder-only pooling model without attention layers:

* the document is a per-request ``passage`` input; ``embed_multimodal`` runs
  the T5Gemma2 text encoder plus Matryoshka chunk pooling over every passage
  of a step at once, and vLLM's encoder cache keeps the pooled states, so a
  passage that recurs is encoded once;
* ``embed_input_ids`` scatters the pooled states into the placeholder rows of
  the prompt and ``forward`` hands them to the pooler unchanged;
* the pooler runs the T5Gemma2 decoder (merged self+cross attention) over
  every request of the step in one padded pass and computes only the ``yes``
  and ``no`` rows of the tied LM head at the last position.

The maths is Transformers' own T5Gemma2 modules; the vision tower is never
built and its weights are never read.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pad_sequence
from transformers import initialization
from transformers.models.t5gemma2.modeling_t5gemma2 import (
    T5Gemma2Decoder,
    T5Gemma2TextEncoder,
)
from vllm.config import VllmConfig
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import (
    SupportsCrossEncoding,
    SupportsMultiModal,
    SupportsScoreTemplate,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .constants import NO_TOKEN_ID, PAD_TOKEN_ID, PASSAGE_MODALITY, YES_TOKEN_ID
from .counters import EngineCounters
from .pooler import KaLMYesNoPooler
from .pooling import mep_pool
from .processing import (
    IDS_FIELD,
    SCORE_IDS_KEY,
    STATES_FIELD,
    KaLMPassageDummyInputsBuilder,
    KaLMPassageProcessingInfo,
    KaLMPassageProcessor,
)
from .prompting import pack_score_text
from .settings import EngineSettings

__all__ = ["KaLMT5Gemma2Reranker"]

_SKIPPED_PREFIXES = (
    "lm_head.",  # tied to the embedding; only two rows are ever needed
    "model.decoder.embed_tokens.",  # tied copy of the encoder embedding
    "model.encoder.vision_tower.",
    "model.encoder.multi_modal_projector.",
    "model.encoder.text_model.vision_tower.",
)


@MULTIMODAL_REGISTRY.register_processor(
    KaLMPassageProcessor,
    info=KaLMPassageProcessingInfo,
    dummy_inputs=KaLMPassageDummyInputsBuilder,
)
class KaLMT5Gemma2Reranker(
    nn.Module, SupportsMultiModal, SupportsCrossEncoding, SupportsScoreTemplate
):
    is_pooling_model: ClassVar[bool] = True
    # "LAST" keeps vLLM's causal branch, so the attn_type below is honoured.
    default_seq_pooling_type: ClassVar[str] = "LAST"
    # No vLLM attention layers: no KV cache, no prefix caching, no chunked prefill.
    attn_type: ClassVar[str] = "attention_free"

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = copy.deepcopy(vllm_config.model_config.hf_config)
        self.settings = EngineSettings.from_hf_config(config)
        config._attn_implementation = "sdpa"  # propagates to the sub-configs
        config.is_encoder_decoder = True
        decoder_config = config.decoder
        assert decoder_config.hidden_size == config.encoder.text_config.hidden_size
        self.softcap = decoder_config.final_logit_softcapping
        self.hidden_size = decoder_config.hidden_size

        with initialization.no_init_weights():  # the checkpoint overwrites them
            self.decoder = T5Gemma2Decoder(decoder_config, config.eoi_token_index)
            self.encoder = None
            if not self.settings.decoder_only:
                self.encoder = T5Gemma2TextEncoder(
                    config.encoder.text_config, config.eoi_token_index
                )
                # One embedding table for encoder, decoder and LM head.
                self.encoder.embed_tokens = self.decoder.embed_tokens
        self.decoder.eval()
        if self.encoder is not None:
            self.encoder.eval()
        self.pooler = KaLMYesNoPooler(self.score_requests)
        # Read by the reranker and the server from their own process.
        self.counters = EngineCounters(self.settings.counters_path)

    # --- vLLM score API ---------------------------------------------------------
    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        return None

    @classmethod
    def get_score_template(cls, query: str, document: str) -> str | None:
        return pack_score_text(query, document)

    @classmethod
    def post_process_tokens(cls, prompt: Any) -> None:
        # The score API tokenized pack_score_text(); hand the ids to the passage
        # processor, which rebuilds the KaLM prompt from them. No-op on the
        # empty prompt vLLM 0.33 probes this hook with.
        ids = prompt.get("prompt_token_ids")
        if ids:
            prompt["multi_modal_data"] = {PASSAGE_MODALITY: {SCORE_IDS_KEY: list(ids)}}

    # --- multimodal hooks --------------------------------------------------------
    def get_language_model(self) -> nn.Module:
        return self

    @torch.inference_mode()
    def embed_multimodal(self, **kwargs: Any) -> list[torch.Tensor]:
        if STATES_FIELD in kwargs:  # precomputed by a passage store
            states = _as_list(kwargs[STATES_FIELD])
            self.counters.add(passages_from_store=len(states))
            return [s.to(self._dtype) for s in states]
        passages = _as_list(kwargs[IDS_FIELD])
        assert self.encoder is not None, "decoder-only engines accept only states"
        lengths = torch.tensor([len(p) for p in passages])
        ids = pad_sequence(passages, batch_first=True, padding_value=PAD_TOKEN_ID)
        mask = (torch.arange(ids.shape[1]) < lengths[:, None]).to(
            ids.device, torch.long
        )
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled, pooled_mask = mep_pool(hidden, mask, self.settings.chunk_size)
        rows = pooled_mask.sum(1).tolist()  # right padding: valid chunks come first
        self.counters.add(
            passages_encoded=len(passages), passage_tokens_encoded=int(lengths.sum())
        )
        return [pooled[i, :n] for i, n in enumerate(rows)]

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: Any = None,
        *,
        is_multimodal: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        # Decoder rows stay zero (the pooler embeds decoder ids itself);
        # passage rows receive the pooled encoder states.
        rows = torch.zeros(
            input_ids.shape[0],
            self.hidden_size,
            dtype=self._dtype,
            device=input_ids.device,
        )
        if multimodal_embeddings is not None and len(multimodal_embeddings) > 0:
            rows[is_multimodal] = torch.cat(list(multimodal_embeddings)).to(rows.dtype)
        return rows

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            assert input_ids is not None
            return self.embed_input_ids(input_ids)
        return inputs_embeds

    # --- the decoder pass ---------------------------------------------------------
    @torch.inference_mode()
    def score_requests(
        self, passages: list[torch.Tensor], prompts: list[torch.Tensor]
    ) -> torch.Tensor:
        """Margins ``yes_logit - no_logit`` (float32) for a batch of requests.

        Args:
            passages: per request, pooled passage states ``[C_i, d]``.
            prompts: per request, decoder prompt ids ``[T_i]`` (CPU).
        """
        device = self._device
        num = len(prompts)
        dec_lens = torch.tensor([len(p) for p in prompts])
        dec_ids = pad_sequence(prompts, batch_first=True, padding_value=PAD_TOKEN_ID)
        dec_mask = torch.arange(dec_ids.shape[1]) < dec_lens[:, None]  # [B, T]
        enc_lens = torch.tensor([len(p) for p in passages])
        max_rows = max(1, int(enc_lens.max()))
        states = torch.zeros(
            num, max_rows, self.hidden_size, dtype=self._dtype, device=device
        )  # [B, C, d]
        for i, passage in enumerate(passages):
            states[i, : len(passage)] = passage
        enc_mask = torch.arange(max_rows) < enc_lens[:, None]  # [B, C]

        hidden = self.decoder(
            input_ids=dec_ids.to(device),
            attention_mask=dec_mask.to(device, torch.long),
            encoder_hidden_states=states,
            encoder_attention_mask=enc_mask.to(device, torch.long),
        ).last_hidden_state  # [B, T, d]
        last = hidden[torch.arange(num, device=device), (dec_lens - 1).to(device)]
        # Tied LM head, yes and no rows only, in float32.
        head = self.decoder.embed_tokens.weight[[YES_TOKEN_ID, NO_TOKEN_ID]]
        logits = last.float() @ head.float().T  # [B, 2]
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        self.counters.add(requests_scored=num)
        return logits[:, 0] - logits[:, 1]

    # --- weights -------------------------------------------------------------------
    def is_unused_checkpoint_weight(self, name: str) -> bool:
        return self._target_name(name) is None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            target = self._target_name(name)
            if target is None:
                continue
            if target not in params:
                raise KeyError(
                    f"Checkpoint tensor {name!r} maps to unknown {target!r}."
                )
            default_weight_loader(params[target], tensor)
            loaded.add(target)
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"Checkpoint lacks weights for: {sorted(missing)[:8]}")
        return loaded

    def _target_name(self, name: str) -> str | None:
        """Our parameter for a checkpoint tensor, or None when it is not needed.

        Accepts both key layouts: on disk (``model.encoder.layers...``) and the
        in-memory one of Transformers 5 (``model.encoder.text_model.layers...``).
        """
        if name.startswith(_SKIPPED_PREFIXES):
            return None
        if name.startswith("model.decoder."):
            return "decoder." + name.removeprefix("model.decoder.")
        if name.startswith("model.encoder."):
            rest = name.removeprefix("model.encoder.").removeprefix("text_model.")
            if rest.startswith("embed_tokens."):
                return "decoder." + rest  # the shared table lives on the decoder
            return None if self.encoder is None else "encoder." + rest
        return None

    # --- helpers ----------------------------------------------------------------
    @property
    def _dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    @property
    def _device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device


def _as_list(value: Any) -> list[torch.Tensor]:
    """vLLM batches same-shape items into one tensor and others into a list."""
    return list(value.unbind(0)) if isinstance(value, torch.Tensor) else list(value)
