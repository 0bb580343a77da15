# SPDX-License-Identifier: Apache-2.0
"""``kalm-vllm-encode`` flags go through the package's one parser per concept."""

from __future__ import annotations

from pathlib import Path

import pytest

from kalm_t5gemma2_vllm_plugin.store.format import PassageStore
from tests.helpers import run_encode, write_corpus


@pytest.mark.parametrize(
    ("flag", "stored"), [("bf16", "bfloat16"), ("fp32", "float32")]
)
def test_dtype_spellings_store_the_one_canonical_name(
    tiny_checkpoint: Path, tmp_path: Path, flag: str, stored: str
) -> None:
    corpus = write_corpus(tmp_path / "c.jsonl", {"a": "x", "b": "two words"})
    run_encode(tiny_checkpoint, corpus, tmp_path / "store", "--dtype", flag)
    reader = PassageStore(tmp_path / "store")
    try:
        assert reader.identity.dtype == stored
        assert reader.ids() == ["a", "b"]
        (states,) = reader.get(["a"])
        assert str(states.dtype) == f"torch.{stored}"
    finally:
        reader.close()


def test_a_bad_dtype_is_an_error_naming_the_flag(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    corpus = write_corpus(tmp_path / "c.jsonl", {"a": "x"})
    done = run_encode(
        tiny_checkpoint, corpus, tmp_path / "store", "--dtype", "int8", check=False
    )
    assert done.returncode == 2
    assert "kalm-vllm-encode: error: --dtype must be one of" in done.stderr
    assert "Traceback" not in done.stderr
