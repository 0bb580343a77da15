# SPDX-License-Identifier: Apache-2.0
"""The vLLM-version shims (``engine/vllm_compat.py``) on the installed vLLM."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kalm_t5gemma2_vllm_plugin.engine import vllm_compat
from kalm_t5gemma2_vllm_plugin.errors import KaLMEngineError

PACKAGE = Path(vllm_compat.__file__).parents[1]


def test_the_supported_releases_are_0_32_to_0_34_and_include_this_one() -> None:
    import vllm

    assert set(vllm_compat.SUPPORTED_VLLM) == {(0, 32), (0, 33), (0, 34)}
    assert vllm_compat.support_line().startswith(f"vLLM {vllm.__version__}: ")


def test_every_vllm_variable_the_package_names_is_one_vllm_defines() -> None:
    """vLLM 0.34 warns about (or refuses) unknown VLLM_* variables."""
    from vllm.envs import environment_variables

    named = {
        name
        for path in PACKAGE.rglob("*.py")
        for name in re.findall(r"\bVLLM_[A-Z0-9_]+\b", path.read_text())
    }
    assert named, "the scan found nothing: the test would not guard anything"
    assert named <= set(environment_variables), named - set(environment_variables)


def test_margins_come_out_of_both_engine_output_shapes() -> None:
    classify = SimpleNamespace(outputs=SimpleNamespace(probs=[1.25]))
    encode = SimpleNamespace(outputs=SimpleNamespace(data=torch.tensor([[-3.5]])))
    assert vllm_compat.margin_from_classify(classify) == 1.25
    assert vllm_compat.margin_from_encode(encode) == -3.5


@pytest.mark.parametrize("bad", [[float("nan")], [float("inf")], [], [1.0, 2.0]])
def test_a_non_finite_or_missing_margin_is_an_engine_error(bad: list[float]) -> None:
    with pytest.raises(KaLMEngineError, match="one finite margin"):
        vllm_compat.margin_from_classify(
            SimpleNamespace(outputs=SimpleNamespace(probs=bad))
        )


def test_vllm_request_errors_include_its_client_errors() -> None:
    from vllm.exceptions import VLLMValidationError

    assert issubclass(VLLMValidationError, vllm_compat.request_error_types())
    assert issubclass(ValueError, vllm_compat.request_error_types())
