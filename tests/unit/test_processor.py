# SPDX-License-Identifier: Apache-2.0
"""The "passage" processor, built by vLLM's registry from a model config (no
engine): placeholders, cache keys, what it accepts and refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kalm_t5gemma2_vllm_plugin.constants import PASSAGE_MODALITY, PLACEHOLDER_TOKEN_ID
from kalm_t5gemma2_vllm_plugin.errors import KaLMInputError
from kalm_t5gemma2_vllm_plugin.mep import pooled_length
from kalm_t5gemma2_vllm_plugin.passage_key import passage_key
from kalm_t5gemma2_vllm_plugin.prompt import encode_document
from kalm_t5gemma2_vllm_plugin.vllm_model.config import (
    KEY_FIELD,
    STATES_FIELD,
    EngineSettings,
)

PROMPT = [2, 105, 7, 8]  # starts with <bos>, as every KaLM decoder prompt


def _processor(checkpoint: Path, settings: EngineSettings) -> Any:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.multimodal import MULTIMODAL_REGISTRY

    import kalm_t5gemma2_vllm_plugin as plugin

    plugin.register()
    config = EngineArgs(
        model=str(checkpoint),
        runner="pooling",
        hf_overrides=settings.hf_overrides(),
        limit_mm_per_prompt={PASSAGE_MODALITY: 1},
        max_model_len=2048,
    ).create_model_config()
    return MULTIMODAL_REGISTRY.create_processor(config)


@pytest.fixture(scope="module")
def processor(tiny_checkpoint: Path) -> Any:
    return _processor(tiny_checkpoint, EngineSettings(chunk_size=4))


def _apply(processor: Any, passage: object, prompt: list[int] = PROMPT) -> Any:
    from vllm.multimodal.processing import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs

    items = processor.info.parse_mm_data({PASSAGE_MODALITY: passage})
    inputs = ProcessorInputs(prompt=prompt, mm_data_items=items)
    return processor.apply(inputs, TimingContext(enabled=False))


def test_text_and_its_ids_are_one_passage_with_ceil_l_over_n_placeholders(
    processor: Any,
) -> None:
    text = "The capital of China is Beijing."
    ids = encode_document(processor.info.get_tokenizer(), text, 1024).ids
    by_text, by_ids = _apply(processor, text), _apply(processor, ids)
    rows = pooled_length(len(ids), 4)
    for out in (by_text, by_ids):
        assert out["prompt_token_ids"] == [PLACEHOLDER_TOKEN_ID] * rows + PROMPT
        (placeholder,) = out["mm_placeholders"][PASSAGE_MODALITY]
        assert (placeholder.offset, placeholder.length) == (0, rows)
        item = out["mm_kwargs"][PASSAGE_MODALITY][0]
        key = bytes(item[KEY_FIELD].data.tolist()).hex()
        assert key == passage_key(ids, 4)
    assert by_text["mm_hashes"] == by_ids["mm_hashes"]
    assert _apply(processor, ids[:-1])["mm_hashes"] != by_ids["mm_hashes"]


def test_a_prompt_starting_with_the_placeholder_id_is_refused(processor: Any) -> None:
    with pytest.raises(KaLMInputError, match="must not start with token id 0"):
        _apply(processor, "text", prompt=[PLACEHOLDER_TOKEN_ID, 2, 3])


def test_states_are_refused_by_an_engine_without_a_store(processor: Any) -> None:
    with pytest.raises(KaLMInputError, match="only by an engine started") as e:
        _apply(processor, {STATES_FIELD: torch.zeros(3, 64)})
    assert e.value.field == STATES_FIELD


def test_a_stored_passage_takes_its_rows_and_key_from_the_store(
    tiny_checkpoint: Path,
) -> None:
    stored = _processor(
        tiny_checkpoint, EngineSettings(chunk_size=4, allow_passage_states=True)
    )
    key = passage_key([2, 5, 6], 4)
    out = _apply(stored, {STATES_FIELD: torch.zeros(3, 64), KEY_FIELD: key})
    assert out["prompt_token_ids"][:4] == [PLACEHOLDER_TOKEN_ID] * 3 + [PROMPT[0]]
    item = out["mm_kwargs"][PASSAGE_MODALITY][0]
    assert bytes(item[KEY_FIELD].data.tolist()).hex() == key
    for bad in ({STATES_FIELD: torch.zeros(3, 7)}, {STATES_FIELD: "x"}):
        with pytest.raises(KaLMInputError, match="shape"):
            _apply(stored, bad)
    with pytest.raises(KaLMInputError, match="hex digits"):
        _apply(stored, {STATES_FIELD: torch.zeros(3, 64), KEY_FIELD: "zz"})
