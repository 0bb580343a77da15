# SPDX-License-Identifier: Apache-2.0
"""One KaLM engine seen from the caller's side, shared by the offline reranker
(``LLM``) and the HTTP service (``AsyncLLM``).

``EngineSession`` owns what both need besides the engine's submit loop: the
checked options, the tokenizer and request builder, the passage store, the
counters and their baseline, the vLLM engine arguments, and the shutdown,
including the watchdog (``watchdog.py``) that stops the engine's processes
if this process dies without closing it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kalm_t5gemma2_vllm_plugin.constants import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_INSTRUCTION,
    DEFAULT_STORE_REFRESH_S,
    DEFAULT_SYSTEM_INSTRUCTION,
    PASSAGE_MODALITY,
)
from kalm_t5gemma2_vllm_plugin.counters import LEVELS, EngineCounters
from kalm_t5gemma2_vllm_plugin.engine.requests import EnginePrompt, PromptBuilder
from kalm_t5gemma2_vllm_plugin.engine.vllm_compat import (
    check_vllm_runtime,
    engine_dtype,
    platform_engine_kwargs,
)
from kalm_t5gemma2_vllm_plugin.engine.watchdog import EngineWatchdog
from kalm_t5gemma2_vllm_plugin.errors import KaLMEngineError, KaLMInputError
from kalm_t5gemma2_vllm_plugin.mep import pooled_length
from kalm_t5gemma2_vllm_plugin.prompt import check_yes_no_tokens
from kalm_t5gemma2_vllm_plugin.store.format import StoreIdentity
from kalm_t5gemma2_vllm_plugin.store.uri import PassageReader, open_store
from kalm_t5gemma2_vllm_plugin.validation import (
    check_positive_int,
    check_str,
    parse_dtype,
)
from kalm_t5gemma2_vllm_plugin.vllm_model.config import EngineSettings

__all__ = [
    "BATCHED_TOKENS_CEILING",
    "INSTRUCTION_SLACK_TOKENS",
    "LONG_WINDOW_WARNING",
    "EngineOptions",
    "EngineSession",
    "EngineSizes",
    "default_dtype",
    "engine_kwargs",
    "engine_sizes",
]

logger = logging.getLogger(__name__)


def default_dtype() -> str:
    """bf16 on CUDA, float32 elsewhere (as the reference reranker)."""
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


@dataclass(frozen=True)
class EngineOptions:
    """Everything an engine is started with; checked and normalised on creation
    (field names are the ``KaLMVLLMReranker`` keywords)."""

    model: str
    model_path: str
    settings: EngineSettings = field(default_factory=EngineSettings)
    #: ``None``: bf16 on CUDA, float32 on CPU.
    dtype: str | None = None
    #: ``None``: derived by ``engine_sizes`` (a full-length request fits).
    max_model_len: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    #: vLLM's token budget per step; ``None``: derived by ``engine_sizes``.
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float | None = None
    instruction: str = DEFAULT_INSTRUCTION
    system_instruction: str = DEFAULT_SYSTEM_INSTRUCTION
    #: A store written by ``kalm-vllm-encode`` (a directory, or a Lance URI:
    #: ``store/uri.py``): documents may come by id.
    passage_store: str | None = None
    #: Lance storage options (endpoint, keys, ...) over the ``AWS_*`` ones.
    store_options: dict[str, str] = field(default_factory=dict)
    #: Seconds between looks for a newer version of a Lance store (how stale
    #: a replica may be); 0: before every request.
    store_refresh_s: float = DEFAULT_STORE_REFRESH_S
    #: More keyword arguments for ``vllm.LLM`` / ``AsyncEngineArgs``.
    engine_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def normal(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        normal("dtype", parse_dtype(self.dtype, "dtype"))
        for name in ("max_model_len", "max_num_batched_tokens"):
            if getattr(self, name) is not None:
                normal(name, check_positive_int(getattr(self, name), name))
        normal("batch_size", check_positive_int(self.batch_size, "batch_size"))
        for name in ("max_model_len", "max_num_batched_tokens", "max_num_seqs"):
            if name in self.engine_args:
                raise KaLMInputError(
                    f"Give {name} as the engine option, not as a vLLM engine "
                    f"argument: the plugin sizes the engine in one place.",
                    field=name,
                )
        utilization = self.gpu_memory_utilization
        if utilization is not None and (
            isinstance(utilization, bool)
            or not isinstance(utilization, int | float)
            or not 0 < utilization <= 1
        ):
            raise KaLMInputError(
                f"gpu_memory_utilization must be in (0, 1], got {utilization!r}.",
                field="gpu_memory_utilization",
            )
        check_str(self.instruction, "instruction")
        check_str(self.system_instruction, "system_instruction")
        refresh = self.store_refresh_s
        if (
            isinstance(refresh, bool)
            or not isinstance(refresh, int | float)
            or not 0 <= refresh < float("inf")
        ):
            raise KaLMInputError(
                f"store_refresh_s must be a number of seconds >= 0, got {refresh!r}.",
                field="store_refresh_s",
            )
        normal("store_refresh_s", float(refresh))
        normal("store_options", {str(k): str(v) for k, v in self.store_options.items()})
        if self.passage_store is not None:
            normal("passage_store", os.fspath(self.passage_store))
        if self.settings.decoder_only and self.passage_store is None:
            raise KaLMInputError(
                "decoder_only=True needs a passage_store: without an encoder every "
                "document must come precomputed.",
                field="decoder_only",
            )
        if self.settings.allow_passage_states != (self.passage_store is not None):
            normal(
                "settings",
                dataclasses.replace(
                    self.settings, allow_passage_states=self.passage_store is not None
                ),
            )


#: ``document_max_length`` above which the engine warns (training used <= 512).
LONG_WINDOW_WARNING = 1024
#: Positions beyond the default instruction's prompt that a derived
#: ``max_model_len`` keeps for longer per-request instructions.
INSTRUCTION_SLACK_TOKENS = 256
#: Most tokens (passage rows + decoder prompts) per engine step by default, per
#: device: 32 full-length requests of the default settings (~830 each) fit.
BATCHED_TOKENS_CEILING = {"cpu": 32768, "cuda": 65536}


@dataclass(frozen=True)
class EngineSizes:
    """The engine's sizes, owned by ``engine_sizes`` alone."""

    max_model_len: int
    max_num_batched_tokens: int
    max_num_seqs: int
    #: A full-length query and document with the default instruction.
    longest_request: int

    def describe(self) -> str:
        return (
            f"max_model_len={self.max_model_len} "
            f"max_num_batched_tokens={self.max_num_batched_tokens} "
            f"max_num_seqs={self.max_num_seqs} "
            f"(longest request {self.longest_request})"
        )


def engine_sizes(
    settings: EngineSettings,
    *,
    prompt_tokens: int,
    batch_size: int,
    max_model_len: int | None = None,
    max_num_batched_tokens: int | None = None,
    device: str = "cpu",
    max_positions: int | None = None,
) -> EngineSizes:
    """Sizes with which no admissible request stalls and a step is not throttled.

    ``document_max_length`` may reach the encoder's ``max_positions`` (the
    checkpoint's ``max_position_embeddings``), with a warning above
    ``LONG_WINDOW_WARNING`` tokens: the model was trained on passages of at
    most 512. Windows of long documents (``windows.py``) and per-request
    compression never need more than these sizes: a window is at most a
    full-length document, and a coarser factor only makes it shorter.

    ``max_model_len`` covers a full-length request (pooled rows of a full
    document + full query + the prompt, plus room for longer instructions);
    ``max_num_batched_tokens`` is at least that (chunked prefill is off for this
    model, so a request larger than the budget would wait forever) and at least
    ``batch_size`` full-length requests, up to the device's ceiling. Explicit
    values too small for an admissible request are refused, naming both.
    """
    if max_positions is not None and settings.document_max_length > max_positions:
        raise KaLMInputError(
            f"document_max_length={settings.document_max_length} is beyond the "
            f"encoder's {max_positions} positions (max_position_embeddings of the "
            f"checkpoint); lower it, or rank long documents as windows "
            f"(long_document='max').",
            field="document_max_length",
        )
    if settings.document_max_length > LONG_WINDOW_WARNING:
        logger.warning(
            "document_max_length=%d: KaLM-Reranker-V1 was trained on passages of "
            "at most 512 tokens; quality beyond %d is not measured. Windows "
            "(long_document='max') keep each passage within what it has seen.",
            settings.document_max_length,
            LONG_WINDOW_WARNING,
        )
    rows = pooled_length(settings.document_max_length, settings.pool_factor)
    longest = rows + settings.query_max_length + prompt_tokens
    if max_model_len is None:
        max_model_len = longest + INSTRUCTION_SLACK_TOKENS
    elif max_model_len < longest:
        raise KaLMInputError(
            f"max_model_len={max_model_len} is too small: a full-length query and "
            f"document need {longest} positions ({prompt_tokens} prompt + "
            f"{settings.query_max_length} query + {rows} pooled document rows); "
            f"raise max_model_len or lower query_max_length/document_max_length.",
            field="max_model_len",
        )
    if max_num_batched_tokens is None:
        ceiling = BATCHED_TOKENS_CEILING.get(device, BATCHED_TOKENS_CEILING["cpu"])
        max_num_batched_tokens = max(max_model_len, min(batch_size * longest, ceiling))
    elif max_num_batched_tokens < max_model_len:
        raise KaLMInputError(
            f"max_num_batched_tokens={max_num_batched_tokens} is smaller than "
            f"max_model_len={max_model_len}: a request that long would never be "
            f"scheduled (this model runs without chunked prefill). Raise "
            f"max_num_batched_tokens or lower max_model_len.",
            field="max_num_batched_tokens",
        )
    return EngineSizes(max_model_len, max_num_batched_tokens, batch_size, longest)


def encoder_positions(model_path: str) -> int | None:
    """The encoder's ``max_position_embeddings`` from the checkpoint's
    config.json (``None`` when it does not say)."""
    path = Path(model_path) / "config.json"
    try:
        config = json.loads(path.read_text())
        text = config["encoder"].get("text_config", config["encoder"])
        value = text["max_position_embeddings"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def engine_kwargs(
    options: EngineOptions, settings: EngineSettings, sizes: EngineSizes
) -> dict[str, Any]:
    """The vLLM engine arguments for a KaLM checkpoint (offline and server)."""
    kwargs: dict[str, Any] = dict(
        model=options.model_path,
        runner="pooling",
        # Our model is not torch.compile'd and has no CUDA-graph-able decoder step.
        enforce_eager=True,
        dtype=options.dtype or default_dtype(),
        max_model_len=sizes.max_model_len,
        max_num_batched_tokens=sizes.max_num_batched_tokens,
        max_num_seqs=sizes.max_num_seqs,
        hf_overrides=settings.hf_overrides(),
        limit_mm_per_prompt={PASSAGE_MODALITY: 1},
    )
    kwargs.update(platform_engine_kwargs(options.gpu_memory_utilization))
    kwargs.update(options.engine_args)
    return kwargs


class EngineSession:
    """The caller's side of one engine: prepare, ``start``, build requests,
    count, ``close``. The owner submits requests its own way (``LLM.classify``
    or ``AsyncLLM.encode``).

    Preparing checks the checkpoint's tokenizer, the instruction, vLLM and the
    store; nothing is left behind if it fails.
    """

    def __init__(self, options: EngineOptions) -> None:
        from transformers import AutoTokenizer

        self.options = options
        self.settings = options.settings
        self.engine: Any = None
        self.dtype: str = options.dtype or default_dtype()
        self.store: PassageReader | None = None
        self.counters: EngineCounters | None = None
        self._shutdown: Callable[[Any], None] | None = None
        self._watchdog: EngineWatchdog | None = None
        self._refreshed = time.monotonic()
        # An HF fast tokenizer; the prompt code types it by the calls it makes.
        tokenizer: Any = AutoTokenizer.from_pretrained(options.model_path)
        self.tokenizer = tokenizer
        check_yes_no_tokens(self.tokenizer)
        self.requests = PromptBuilder(
            self.tokenizer,
            self.settings,
            max_model_len=0,  # set below, once the sizes are known
            system_instruction=options.system_instruction,
        )
        import torch

        self.sizes = engine_sizes(
            self.settings,
            prompt_tokens=self.requests.prompt_tokens(DEFAULT_INSTRUCTION),
            batch_size=options.batch_size,
            max_model_len=options.max_model_len,
            max_num_batched_tokens=options.max_num_batched_tokens,
            device="cuda" if torch.cuda.is_available() else "cpu",
            max_positions=encoder_positions(options.model_path),
        )
        self.requests.max_model_len = self.sizes.max_model_len
        logger.info("KaLM engine sizes: %s", self.sizes.describe())
        self.requests.check_instruction(options.instruction)
        check_vllm_runtime()
        try:
            if options.passage_store is not None:
                self.store = open_store(
                    options.passage_store,
                    storage_options=options.store_options,
                    expected=StoreIdentity.for_engine(
                        options.model_path,
                        self.settings.chunk_size,
                        self.settings.document_max_length,
                        self.dtype,
                    ),
                )
            self.counters = EngineCounters.create()
            self.engine_args = engine_kwargs(
                options,
                dataclasses.replace(
                    self.settings, counters_path=str(self.counters.path)
                ),
                self.sizes,
            )
        except BaseException:
            self._release()
            raise
        self._counters_at_start = self.counters.snapshot()

    def start(
        self, build: Callable[[dict[str, Any]], Any], shutdown: Callable[[Any], None]
    ) -> Any:
        """Build the engine from the engine arguments; on failure release
        everything the session holds."""
        watchdog = EngineWatchdog.start()
        try:
            engine = build(self.engine_args)
        except BaseException:
            if watchdog is not None:
                watchdog.stop()
            self._release()
            raise
        if watchdog is not None:
            watchdog.started()
        self._watchdog = watchdog
        self.engine, self._shutdown = engine, shutdown
        self.dtype = engine_dtype(engine)
        # Start-up (profiling, warm-up) may run dummy passages; count from here.
        assert self.counters is not None
        self._counters_at_start = self.counters.snapshot()
        return engine

    def instruction(self, instruction: str | None) -> str:
        """The instruction of a call: the engine's default, or a checked one."""
        if instruction is None:
            return self.options.instruction
        instruction = check_str(instruction, "instruction")
        self.requests.check_instruction(instruction)
        return instruction

    def build(
        self,
        pairs: Sequence[tuple[str, str]],
        instruction: str,
        *,
        document_max_length: int | None = None,
        max_tokens: int | None = None,
        field: str = "pairs",
        chunk_size: int | None = None,
    ) -> list[EnginePrompt]:
        """Engine requests for validated pairs (documents by text, ``DocumentId``
        or ``StoredWindow``) and an instruction ``instruction()`` returned;
        thread-safe, so callers may build off their event loop. ``max_tokens``,
        ``chunk_size``: ``PromptBuilder.build``."""
        self.refresh_store()
        return self.requests.build(
            pairs,
            instruction,
            document_max_length=document_max_length,
            store=self.store,
            max_tokens=max_tokens,
            field=field,
            chunk_size=chunk_size,
        )

    def refresh_store(self) -> bool:
        """Look for a newer version of the store once ``store_refresh_s`` has
        passed since the last look (Lance: passages appended by a later
        encoding run become visible; a directory store sees every commit
        anyway). ``True`` when the store moved."""
        store = self.store
        now = time.monotonic()
        if store is None or now - self._refreshed < self.options.store_refresh_s:
            return False
        self._refreshed = now
        return self.requests.refresh_store(store)

    def stats(self) -> dict[str, int]:
        """Engine counters since start: passages encoded (and their tokens),
        passages received precomputed, requests scored."""
        if self.counters is None:  # closed
            return {}
        now = self.counters.snapshot()
        return {
            k: now[k] if k in LEVELS else now[k] - self._counters_at_start.get(k, 0)
            for k in now
        }

    def check_open(self) -> Any:
        if self.engine is None:
            raise KaLMEngineError("The engine has been shut down.")
        return self.engine

    def close(self) -> None:
        """Shut the engine down and release the counters and store; idempotent."""
        engine, self.engine = self.engine, None
        try:
            if engine is not None and self._shutdown is not None:
                self._shutdown(engine)
        finally:
            watchdog, self._watchdog = self._watchdog, None
            if watchdog is not None:
                watchdog.stop()
            self._release()

    def _release(self) -> None:
        counters, self.counters = self.counters, None
        if counters is not None:
            counters.unlink()
        store, self.store = self.store, None
        if store is not None:
            store.close()
