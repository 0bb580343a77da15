# SPDX-License-Identifier: Apache-2.0
"""What vLLM reads from the plugin's classes, without an engine."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kalm_t5gemma2_vllm_plugin.constants import ARCHITECTURE, PLACEHOLDER_TOKEN_ID
from kalm_t5gemma2_vllm_plugin.errors import KaLMInputError
from kalm_t5gemma2_vllm_plugin.vllm_model.config import EngineSettings


def test_the_model_declares_itself_through_vllms_own_decorators() -> None:
    from vllm.model_executor.models.interfaces import is_attention_free
    from vllm.model_executor.models.interfaces_base import (
        get_attn_type,
        get_default_seq_pooling_type,
        is_pooling_model,
    )

    from kalm_t5gemma2_vllm_plugin.vllm_model.model import KaLMT5Gemma2Reranker

    assert KaLMT5Gemma2Reranker.__name__ == ARCHITECTURE
    assert get_attn_type(KaLMT5Gemma2Reranker) == "attention_free"
    assert get_default_seq_pooling_type(KaLMT5Gemma2Reranker) == "LAST"
    assert is_pooling_model(KaLMT5Gemma2Reranker)
    # True would send Model Runner V2 to its Mamba state path (0.32-0.34).
    assert not is_attention_free(KaLMT5Gemma2Reranker)


def test_leading_placeholders_split_passage_rows_from_decoder_ids() -> None:
    from kalm_t5gemma2_vllm_plugin.vllm_model.processor import leading_placeholders

    p = PLACEHOLDER_TOKEN_ID
    assert leading_placeholders(torch.tensor([p, p, p, 2, 105, 7])) == 3
    assert leading_placeholders(torch.tensor([2, 105])) == 0
    # Model Runner V2's warm-up request: one passage row, decoder prompt [1].
    assert leading_placeholders(torch.tensor([0, 1])) == 1
    # Model Runner V1's dummy pooler run sends all-zero ids: the decoder keeps
    # one position instead of getting an empty prompt.
    assert leading_placeholders(torch.zeros(16, dtype=torch.long)) == 15
    assert leading_placeholders(torch.zeros(1, dtype=torch.long)) == 0


def test_engine_settings_round_trip_through_hf_overrides() -> None:
    settings = EngineSettings(
        chunk_size=8,
        document_max_length=300,
        query_max_length=40,
        allow_passage_states=True,
        decoder_only=True,
        counters_path="/tmp/c.bin",
    )
    overrides = settings.hf_overrides()
    assert overrides["architectures"] == [ARCHITECTURE]
    assert overrides["is_encoder_decoder"] is False
    assert EngineSettings.from_hf_config(SimpleNamespace(**overrides)) == settings
    # keys absent from an HF config take the defaults
    assert EngineSettings.from_hf_config(SimpleNamespace()) == EngineSettings()


@pytest.mark.parametrize(
    ("given", "kept"), [("4", 4), (" 16 ", 16), ("none", None), (None, None), (2, 2)]
)
def test_engine_settings_normalise_the_chunk_size(given: object, kept: object) -> None:
    assert EngineSettings(chunk_size=given).chunk_size == kept  # type: ignore[arg-type]


def test_engine_settings_name_the_bad_field() -> None:
    with pytest.raises(KaLMInputError, match="encoder_chunk_size") as error:
        EngineSettings(chunk_size="3")  # type: ignore[arg-type]
    assert error.value.field == "encoder_chunk_size"
    with pytest.raises(KaLMInputError) as error:
        EngineSettings(document_max_length=0)
    assert error.value.field == "document_max_length"


def test_the_score_template_file_emits_what_pack_score_text_does() -> None:
    import jinja2

    from kalm_t5gemma2_vllm_plugin.vllm_model.score_template import (
        JINJA_TEMPLATE,
        pack_score_text,
    )

    template = jinja2.Template(JINJA_TEMPLATE.read_text(encoding="utf-8"))
    messages = [
        {"role": "query", "content": "q?"},
        {"role": "document", "content": "the doc"},
    ]
    assert template.render(messages=messages) == pack_score_text("q?", "the doc")
    assert template.render(messages=messages, instruction="inst") == (
        pack_score_text("q?", "the doc", "inst")
    )


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_loaded_weight_with_nan_or_inf_is_refused_naming_the_tensor(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, bad: float
) -> None:
    """F13: NaN weights started "healthy" and then failed every request."""
    from kalm_t5gemma2_vllm_plugin.errors import KaLMConfigError
    from kalm_t5gemma2_vllm_plugin.vllm_model import model

    monkeypatch.setattr(model, "_FINITE_CHUNK", 7)  # the bad value in a later chunk
    weight = torch.zeros(4, 8, dtype=dtype)
    model.check_finite("decoder.layers.0.mlp.down_proj.weight", weight)
    weight[3, 5] = bad
    with pytest.raises(KaLMConfigError) as raised:
        model.check_finite("decoder.layers.0.mlp.down_proj.weight", weight)
    message = str(raised.value)
    assert "'decoder.layers.0.mlp.down_proj.weight' holds 1 NaN or infinite" in message
    assert "(of 32)" in message


def test_large_finite_weights_whose_sum_overflows_are_not_refused() -> None:
    from kalm_t5gemma2_vllm_plugin.vllm_model.model import check_finite

    check_finite("big", torch.full((16,), 3.0e38))  # sum is inf, every value finite
    check_finite("half", torch.full((16,), 60000.0, dtype=torch.float16))
    check_finite("ids", torch.arange(10))  # not floating point: nothing to check
