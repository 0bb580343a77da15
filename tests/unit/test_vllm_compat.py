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


def _raised(error: BaseException, *wrappers: type[BaseException]) -> BaseException:
    """``error`` raised and wrapped (``raise W() from e``) as vLLM does."""
    caught = error
    for wrapper in wrappers:
        try:
            raise wrapper() from caught
        except wrapper as exc:
            caught = exc
    return caught


def test_a_request_vllm_refuses_is_the_callers_fault_even_when_wrapped() -> None:
    """F9: AsyncLLM.encode wraps most errors in EngineGenerateError, so a
    prompt too long for max_model_len came back as a 500."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.exceptions import EngineGenerateError

    from kalm_t5gemma2_vllm_plugin.errors import KaLMInputError

    too_long = VLLMValidationError(
        "This model's maximum context length is 1024 tokens."
    )
    for error in (too_long, _raised(too_long, ValueError, EngineGenerateError)):
        failure = vllm_compat.request_failure(error)
        assert type(failure) is KaLMInputError
        assert "maximum context length is 1024" in str(failure)
    plugin = KaLMInputError("Passage states must be finite.", field="passage_states")
    failure = vllm_compat.request_failure(_raised(plugin, EngineGenerateError))
    assert (str(failure), failure.field) == (str(plugin), "passage_states")


def test_any_other_engine_failure_is_the_engines_and_names_no_detail() -> None:
    from vllm.v1.engine.exceptions import EngineGenerateError

    failure = vllm_compat.request_failure(
        _raised(RuntimeError("CUDA error at /secret/path"), EngineGenerateError)
    )
    assert isinstance(failure, KaLMEngineError)
    assert str(failure) == "The engine failed on a request (RuntimeError)."
