# SPDX-License-Identifier: Apache-2.0
"""The fidelity oracle is float32 in every test, also on a CUDA host.

``KaLMReranker`` defaults to bf16 on CUDA (as the model card does), so a test
that builds it without an explicit dtype would compare the engine against a
bf16 oracle on a GPU machine and fail for no plugin fault.
"""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from kalm_t5gemma2_vllm_plugin.rerankers.reference import _torch_dtype

TESTS = Path(__file__).parents[1]


def test_the_reference_defaults_to_bf16_on_cuda() -> None:
    assert _torch_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert _torch_dtype(None, torch.device("cpu")) == torch.float32
    assert _torch_dtype("fp32", torch.device("cuda")) == torch.float32


def test_every_reference_built_by_a_test_names_its_dtype() -> None:
    unpinned = []
    for path in TESTS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", getattr(node.func, "attr", None))
                == "KaLMReranker"
                and "dtype" not in {k.arg for k in node.keywords}
            ):
                unpinned.append(f"{path.relative_to(TESTS)}:{node.lineno}")
    assert not unpinned, f"KaLMReranker(...) without dtype= in: {unpinned}"
