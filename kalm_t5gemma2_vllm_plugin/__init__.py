# SPDX-License-Identifier: Apache-2.0
"""Serve the KaLM-Reranker-V1 rerankers (T5Gemma 2) through vLLM.

vLLM imports this package in every process it starts (plugin discovery), so
importing it is cheap: heavy names load on first attribute access.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import TYPE_CHECKING, Any

from kalm_t5gemma2_vllm_plugin.constants import (
    ARCHITECTURE,
    MODEL_ID,
    PASSAGE_MODALITY,
    PLUGIN_NAME,
    SUPPORTED_ENCODER_CHUNK_SIZES,
)

if TYPE_CHECKING:
    from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import make_checkpoint
    from kalm_t5gemma2_vllm_plugin.engine.requests import DocumentId
    from kalm_t5gemma2_vllm_plugin.rerankers.reference import KaLMReranker
    from kalm_t5gemma2_vllm_plugin.rerankers.vllm import KaLMVLLMReranker
    from kalm_t5gemma2_vllm_plugin.rerankers.vllm import (
        KaLMVLLMReranker as KaLMVLLMOfflineReranker,
    )

try:
    __version__ = metadata.version("kalm-t5gemma2-vllm-plugin")
except (
    metadata.PackageNotFoundError
):  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "ARCHITECTURE",
    "DocumentId",
    "MODEL_ID",
    "PASSAGE_MODALITY",
    "PLUGIN_NAME",
    "SUPPORTED_ENCODER_CHUNK_SIZES",
    "KaLMReranker",
    "KaLMVLLMOfflineReranker",
    "KaLMVLLMReranker",
    "__version__",
    "make_checkpoint",
    "register",
]

_LAZY = {
    "DocumentId": ("engine.requests", "DocumentId"),
    "KaLMReranker": ("rerankers.reference", "KaLMReranker"),
    "KaLMVLLMReranker": ("rerankers.vllm", "KaLMVLLMReranker"),
    # Name used by the original KaLM vLLM adapter.
    "KaLMVLLMOfflineReranker": ("rerankers.vllm", "KaLMVLLMReranker"),
    "make_checkpoint": ("checkpoints.synthetic", "make_checkpoint"),
}


def register() -> None:
    """vLLM plugin entry point: register the reranker architecture (idempotent).

    Runs in every vLLM process; registers by ``"module:Class"`` string so vLLM
    imports the model module only where and when it needs it.
    """
    from vllm import ModelRegistry

    ModelRegistry.register_model(
        ARCHITECTURE, f"{__name__}.vllm_model.model:{ARCHITECTURE}"
    )


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
