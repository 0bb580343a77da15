# SPDX-License-Identifier: Apache-2.0
"""KaLMVLLMReranker's contract: construction, lifecycle, plugin loading."""

import re
from pathlib import Path

import pytest

from kalm_t5gemma2_vllm_plugin import KaLMVLLMReranker
from kalm_t5gemma2_vllm_plugin.errors import KaLMConfigError
from tests.helpers import QUERY


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (
            {"encoder_chunk_size": 3},
            ValueError,
            "encoder_chunk_size must be one of [1, 2, 4, 8, 16, 32]",
        ),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive int, got 0"),
        (
            {"document_max_length": 0},
            ValueError,
            "document_max_length must be a positive int",
        ),
        (
            {"query_max_length": 1.5},
            TypeError,
            "query_max_length must be a positive int",
        ),
        (
            {"max_model_len": -3},
            ValueError,
            "max_model_len must be a positive int, got -3",
        ),
        (
            {"gpu_memory_utilization": 1.5},
            ValueError,
            "gpu_memory_utilization must be in (0, 1]",
        ),
        ({"instruction": 3}, TypeError, "instruction must be a str, got int"),
        ({"max_model_len": 256}, ValueError, "max_model_len=256 is too small"),
    ],
    ids=[
        "chunk",
        "batch",
        "doc-len",
        "query-len",
        "model-len",
        "gpu-mem",
        "instruction",
        "too-small",
    ],
)
def test_constructor_validates_before_starting_an_engine(
    tiny_checkpoint: Path, kwargs: dict, error: type, message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        KaLMVLLMReranker(str(tiny_checkpoint), **kwargs)


def test_plugin_filtered_out_is_reported(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver")
    with pytest.raises(KaLMConfigError, match="leaves out this plugin"):
        KaLMVLLMReranker(str(tiny_checkpoint))


@pytest.mark.engine
def test_closed_reranker_refuses_calls(tiny_checkpoint: Path) -> None:
    with KaLMVLLMReranker(str(tiny_checkpoint), encoder_chunk_size="none") as reranker:
        assert reranker.settings.chunk_size is None
        assert reranker.predict([(QUERY, "d")])
    reranker.close()  # idempotent
    with pytest.raises(RuntimeError, match="The reranker has been closed."):
        reranker.predict([(QUERY, "d")])
