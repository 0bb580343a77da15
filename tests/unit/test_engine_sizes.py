# SPDX-License-Identifier: Apache-2.0
"""``engine_sizes``: the one function that sizes the engine (hand-computed)."""

from __future__ import annotations

import pytest

from kalm_t5gemma2_vllm_plugin.engine.session import (
    BATCHED_TOKENS_CEILING,
    INSTRUCTION_SLACK_TOKENS,
    engine_sizes,
)
from kalm_t5gemma2_vllm_plugin.errors import KaLMInputError
from kalm_t5gemma2_vllm_plugin.vllm_model.config import EngineSettings

DEFAULT = EngineSettings()  # document 1024 at chunk 4 -> 256 rows, query 512


def test_defaults_fit_a_full_length_request_and_a_full_batch() -> None:
    sizes = engine_sizes(DEFAULT, prompt_tokens=59, batch_size=32)
    assert sizes.longest_request == 256 + 512 + 59
    assert sizes.max_model_len == 827 + INSTRUCTION_SLACK_TOKENS
    assert sizes.max_num_batched_tokens == 32 * 827  # 26,464 < the CPU ceiling
    assert sizes.max_num_seqs == 32


def test_the_budget_is_capped_per_device_but_never_below_max_model_len() -> None:
    big = engine_sizes(DEFAULT, prompt_tokens=59, batch_size=256)
    assert big.max_num_batched_tokens == BATCHED_TOKENS_CEILING["cpu"]
    gpu = engine_sizes(DEFAULT, prompt_tokens=59, batch_size=256, device="cuda")
    assert gpu.max_num_batched_tokens == BATCHED_TOKENS_CEILING["cuda"]
    long = EngineSettings(document_max_length=40000, chunk_size=1)
    sizes = engine_sizes(long, prompt_tokens=59, batch_size=1)
    assert sizes.max_num_batched_tokens == sizes.max_model_len > 40000


def test_long_documents_at_chunk_one_derive_a_longer_model_length() -> None:
    settings = EngineSettings(document_max_length=3000, chunk_size=1)
    sizes = engine_sizes(settings, prompt_tokens=59, batch_size=4)
    assert sizes.longest_request == 3000 + 512 + 59
    assert sizes.max_num_batched_tokens >= sizes.max_model_len


def test_an_explicit_max_model_len_too_small_is_refused_naming_both() -> None:
    with pytest.raises(KaLMInputError, match="max_model_len=800 is too small") as e:
        engine_sizes(DEFAULT, prompt_tokens=59, batch_size=8, max_model_len=800)
    assert "need 827 positions" in str(e.value) and e.value.field == "max_model_len"


def test_an_explicit_budget_below_max_model_len_is_refused_naming_both() -> None:
    with pytest.raises(KaLMInputError) as e:
        engine_sizes(
            DEFAULT,
            prompt_tokens=59,
            batch_size=8,
            max_model_len=4096,
            max_num_batched_tokens=2048,
        )
    message = str(e.value)
    assert "max_num_batched_tokens=2048" in message and "max_model_len=4096" in message
    assert e.value.field == "max_num_batched_tokens"
    # explicit values that fit are kept as given
    sizes = engine_sizes(
        DEFAULT,
        prompt_tokens=59,
        batch_size=8,
        max_model_len=4096,
        max_num_batched_tokens=4096,
    )
    assert (sizes.max_model_len, sizes.max_num_batched_tokens) == (4096, 4096)


def test_document_max_length_may_reach_the_encoders_positions_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    long = EngineSettings(document_max_length=4096)
    with caplog.at_level("WARNING", logger="kalm_t5gemma2_vllm_plugin.engine.session"):
        sizes = engine_sizes(long, prompt_tokens=59, batch_size=4, max_positions=4096)
    assert sizes.longest_request == 1024 + 512 + 59
    assert "trained on passages of at most 512 tokens" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="kalm_t5gemma2_vllm_plugin.engine.session"):
        engine_sizes(DEFAULT, prompt_tokens=59, batch_size=4, max_positions=4096)
    assert caplog.text == ""  # 1,024 is not beyond what the default allows
    with pytest.raises(KaLMInputError, match="beyond the encoder's 4096 positions"):
        engine_sizes(
            EngineSettings(document_max_length=4097),
            prompt_tokens=59,
            batch_size=4,
            max_positions=4096,
        )


def test_the_encoders_positions_come_from_the_checkpoint(tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    import json

    from kalm_t5gemma2_vllm_plugin.engine.session import encoder_positions

    config = json.loads((tiny_checkpoint / "config.json").read_text())
    text = config["encoder"].get("text_config", config["encoder"])
    assert encoder_positions(str(tiny_checkpoint)) == text["max_position_embeddings"]
    assert encoder_positions("/nonexistent") is None
