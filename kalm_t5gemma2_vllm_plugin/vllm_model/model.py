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

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn as nn
from vllm.config import VllmConfig
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import (
    SupportsCrossEncoding,
    SupportsMultiModal,
    SupportsScoreTemplate,
)
from vllm.model_executor.models.interfaces_base import attn_type, default_pooling_type
from vllm.multimodal import MULTIMODAL_REGISTRY

from kalm_t5gemma2_vllm_plugin.constants import PASSAGE_MODALITY
from kalm_t5gemma2_vllm_plugin.counters import EngineCounters
from kalm_t5gemma2_vllm_plugin.cpu_tuning import tune_cpu_allocator
from kalm_t5gemma2_vllm_plugin.errors import KaLMConfigError
from kalm_t5gemma2_vllm_plugin.mep import repool
from kalm_t5gemma2_vllm_plugin.t5gemma2 import (
    build_decoder,
    build_encoder,
    checkpoint_target,
    encode_passages,
)
from kalm_t5gemma2_vllm_plugin.vllm_model.config import (
    IDS_FIELD,
    KEY_FIELD,
    POOL_FIELD,
    SCORE_IDS_KEY,
    STATES_FIELD,
    EngineSettings,
)
from kalm_t5gemma2_vllm_plugin.vllm_model.file_pages import FilePages
from kalm_t5gemma2_vllm_plugin.vllm_model.passage_cache import PassageCache
from kalm_t5gemma2_vllm_plugin.vllm_model.pooler import KaLMYesNoPooler
from kalm_t5gemma2_vllm_plugin.vllm_model.processor import (
    KaLMPassageDummyInputsBuilder,
    KaLMPassageProcessingInfo,
    KaLMPassageProcessor,
)
from kalm_t5gemma2_vllm_plugin.vllm_model.score_template import pack_score_text

__all__ = ["KaLMT5Gemma2Reranker", "check_finite"]

#: Padded tokens per encoder pass: bounds the encoder's activations (8
#: passages of 1,024 tokens) whatever the scheduler hands over in one step;
#: larger passes are no faster per token on CPU (benchmarks/README.md).
ENCODER_BATCH_TOKENS = 8192
#: Elements per partial sum (a chunk whose sum is not finite is recounted).
_FINITE_CHUNK = 1 << 24


def check_finite(name: str, weight: torch.Tensor) -> None:
    """Refuse a loaded weight holding NaN or Inf (a damaged file, or a value
    beyond the engine's dtype): such a model starts, then scores every pair
    NaN. One pass over the weights, in chunks: a sum is NaN or infinite if
    any term is, and on CPU it runs ~25x faster than ``isfinite`` (Nano in
    bf16: 26 ms against 0.73 s, less than the load's own copy); a sum that
    merely overflows is recounted.
    float16 sums in float32, as its own range (65504) would overflow often."""
    if not weight.is_floating_point():
        return
    wide = torch.float32 if weight.dtype == torch.float16 else None
    flat = weight.detach().reshape(-1)
    for start in range(0, flat.numel(), _FINITE_CHUNK):
        chunk = flat[start : start + _FINITE_CHUNK]
        total = torch.sum(chunk, dtype=wide)
        if not bool(torch.isfinite(total)) and not bool(torch.isfinite(chunk).all()):
            bad = int((~torch.isfinite(flat)).sum())
            raise KaLMConfigError(
                f"Checkpoint tensor {name!r} holds {bad} NaN or infinite value(s) "
                f"(of {flat.numel()}) once loaded as {weight.dtype}: the checkpoint "
                f"is damaged or does not fit this dtype; download or convert it "
                f"again."
            )


# "LAST" keeps vLLM's causal branch, so the attn_type is honoured.
@default_pooling_type(seq_pooling_type="LAST")
# No vLLM attention layers: no KV cache, no prefix caching, no chunked prefill.
# Not IsAttentionFree: its is_attention_free=True sends Model Runner V2 to its
# Mamba state path (v1/worker/gpu/model_states/__init__.py, 0.32-0.34).
@attn_type("attention_free")
@MULTIMODAL_REGISTRY.register_processor(
    KaLMPassageProcessor,
    info=KaLMPassageProcessingInfo,
    dummy_inputs=KaLMPassageDummyInputsBuilder,
)
class KaLMT5Gemma2Reranker(
    nn.Module, SupportsMultiModal, SupportsCrossEncoding, SupportsScoreTemplate
):
    is_pooling_model: ClassVar[bool] = True

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.settings = EngineSettings.from_hf_config(config)
        if vllm_config.device_config.device_type == "cpu":
            tune_cpu_allocator()  # this runs in the process that runs the model
        self.softcap = config.decoder.final_logit_softcapping
        self.hidden_size = config.decoder.hidden_size
        self.decoder = build_decoder(config)
        # One embedding table (on the decoder) for encoder, decoder and LM head.
        self.encoder = (
            None
            if self.settings.decoder_only
            else build_encoder(config, self.decoder.embed_tokens)
        )
        # Read by the reranker and the server from their own process.
        self.counters = EngineCounters(self.settings.counters_path)
        self.pooler = KaLMYesNoPooler(self.decoder, self.softcap, self.counters)
        # Not verified on a GPU: held on the model's device, outside what
        # vLLM profiles (see README, "Passage reuse").
        self.passage_cache = PassageCache(
            int(self.settings.passage_cache_mb * 2**20), self.counters
        )

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
        # empty prompt vLLM 0.33 and 0.34 probe this hook with.
        ids = prompt.get("prompt_token_ids")
        if ids:
            prompt["multi_modal_data"] = {PASSAGE_MODALITY: {SCORE_IDS_KEY: list(ids)}}

    # --- multimodal hooks --------------------------------------------------------
    def get_language_model(self) -> KaLMT5Gemma2Reranker:
        return self

    @torch.inference_mode()
    def embed_multimodal(self, **kwargs: Any) -> list[torch.Tensor]:
        # Called for the passages vLLM's encoder cache does not hold; the
        # plugin's cache serves what it can, the rest is encoded in batches.
        # Both caches' keys name the pooling the states were made with; a
        # request's own factor is applied last (mep.repool).
        keys = [bytes(k.tolist()).hex() for k in _as_list(kwargs[KEY_FIELD])]
        pools = [p.tolist() for p in _as_list(kwargs[POOL_FIELD])]
        if STATES_FIELD in kwargs:  # precomputed by a passage store
            found = [s.to(self._dtype) for s in _as_list(kwargs[STATES_FIELD])]
            self.counters.add(passages_from_store=len(found))
            for key, passage in zip(keys, found, strict=True):
                self.passage_cache.put(key, passage)
        else:
            found = self._encoded(_as_list(kwargs[IDS_FIELD]), keys)
        return [
            repool(states, tokens, source, target)
            for states, (source, target, tokens) in zip(found, pools, strict=True)
        ]

    def _encoded(
        self, passages: list[torch.Tensor], keys: list[str]
    ) -> list[torch.Tensor]:
        """Pooled states at the engine's factor: from the passage cache, else
        encoded, at most ``ENCODER_BATCH_TOKENS`` padded tokens per encoder
        pass (the scheduler may hand over dozens of long passages at once)."""
        found = [self.passage_cache.get(key) for key in keys]
        misses = [i for i, states in enumerate(found) if states is None]
        if not misses:
            return found  # type: ignore[return-value]
        assert self.encoder is not None, "decoder-only engines accept only states"
        self.counters.add(
            passages_encoded=len(misses),
            passage_tokens_encoded=sum(len(passages[i]) for i in misses),
        )
        # Longest first: batches of similar lengths pad little.
        misses.sort(key=lambda i: -len(passages[i]))
        for batch in _token_batches(misses, passages, ENCODER_BATCH_TOKENS):
            encoded = encode_passages(
                self.encoder, [passages[i] for i in batch], self.settings.chunk_size
            )
            for i, fresh in zip(batch, encoded, strict=True):
                found[i] = fresh
                self.passage_cache.put(keys[i], fresh)
        return found  # type: ignore[return-value]

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

    # --- weights -------------------------------------------------------------------
    def is_unused_checkpoint_weight(self, name: str) -> bool:
        return self._target_name(name) is None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        pages = FilePages()
        for name, tensor in weights:
            target = self._target_name(name)
            if target is None:
                continue
            if target not in params:
                raise KeyError(
                    f"Checkpoint tensor {name!r} maps to unknown {target!r}."
                )
            default_weight_loader(params[target], tensor)
            check_finite(name, params[target])
            pages.release(tensor)
            loaded.add(target)
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"Checkpoint lacks weights for: {sorted(missing)[:8]}")
        return loaded

    def _target_name(self, name: str) -> str | None:
        return checkpoint_target(
            name,
            encoder_prefix=None if self.encoder is None else "encoder.",
            embedding="decoder.embed_tokens",
            decoder_prefix="decoder.",
        )

    # --- helpers ----------------------------------------------------------------
    @property
    def _dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype


def _token_batches(
    order: list[int], passages: list[torch.Tensor], budget: int
) -> list[list[int]]:
    """``order`` (longest first) cut into batches whose padded size
    (members x longest) stays within ``budget`` tokens; one passage at least."""
    batches: list[list[int]] = []
    for i in order:
        if batches and len(passages[batches[-1][0]]) * (len(batches[-1]) + 1) <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _as_list(value: Any) -> list[torch.Tensor]:
    """vLLM batches same-shape items into one tensor and others into a list."""
    return list(value.unbind(0)) if isinstance(value, torch.Tensor) else list(value)
