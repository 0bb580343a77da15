# SPDX-License-Identifier: Apache-2.0
"""Long-document windows and per-request compression, without an engine:
window spans by hand, splitting on the tests' tokenizer, aggregation, exact
re-pooling, and the request checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import synthetic_text
from kalm_t5gemma2_vllm_plugin.engine.requests import DocumentCut
from kalm_t5gemma2_vllm_plugin.errors import KaLMInputError, TooManyItemsError
from kalm_t5gemma2_vllm_plugin.mep import mep_pool, repool
from kalm_t5gemma2_vllm_plugin.prompt import DOCUMENT_PREFIX, encode_document
from kalm_t5gemma2_vllm_plugin.validation import check_request_chunk_size
from kalm_t5gemma2_vllm_plugin.windows import (
    WindowPlan,
    check_long_document,
    check_window_overlap,
    max_tokens_for,
    split_document,
    window_spans,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_checkpoint))


def test_window_spans_by_hand() -> None:
    # 1,000 tokens, windows of 300 overlapping by 60: stride 240; the last
    # window is moved back to end at the end (it overlaps its neighbour by 80).
    assert window_spans(1000, 300, 60) == [
        (0, 300),
        (240, 540),
        (480, 780),
        (700, 1000),
    ]
    # 740 tokens: two regular windows, then one ending at the end
    assert window_spans(740, 300, 60) == [(0, 300), (240, 540), (440, 740)]
    # 720: the third regular window would end exactly at the end
    assert window_spans(720, 300, 60) == [(0, 300), (240, 540), (420, 720)]
    # overlap 80 is capped at a quarter of 300 (75): stride 225
    assert window_spans(1000, 300, 80)[:3] == [(0, 300), (225, 525), (450, 750)]
    assert window_spans(300, 300, 80) == [(0, 300)]  # fits: one window
    assert window_spans(7, 300, 80) == [(0, 7)]
    assert window_spans(301, 300, 80) == [(0, 300), (1, 301)]
    # overlap capped at a quarter of a window: 100 -> 25, stride 75
    assert window_spans(250, 100, 80) == [(0, 100), (75, 175), (150, 250)]
    assert window_spans(250, 100, 0) == [(0, 100), (100, 200), (150, 250)]


@pytest.mark.parametrize(("size", "overlap"), [(300, 80), (100, 80), (17, 3), (5, 0)])
def test_max_tokens_for_is_the_exact_window_limit(size: int, overlap: int) -> None:
    for windows in (1, 2, 3, 7):
        most = max_tokens_for(windows, size, overlap)
        assert len(window_spans(most, size, overlap)) == windows
        assert len(window_spans(most + 1, size, overlap)) == windows + 1


def test_windows_cover_every_token_and_respect_the_overlap() -> None:
    for total in range(1, 700, 37):
        spans = window_spans(total, 120, 80)  # overlap capped to 30
        assert spans[0][0] == 0 and spans[-1][1] == total
        for (a0, a1), (b0, b1) in zip(spans, spans[1:], strict=False):
            assert a1 - a0 == 120 and b1 - b0 == 120
            assert a1 - b0 >= 30  # neighbours share at least the overlap
        assert all(
            b0 - a0 == 90
            for (a0, _), (b0, _) in zip(spans[:-2], spans[1:-1], strict=True)
        )


def test_split_document_windows_are_substrings_with_the_documents_tokens(
    tokenizer,  # type: ignore[no-untyped-def]
) -> None:
    document = synthetic_text(700, seed=3)
    prefix = len(tokenizer(DOCUMENT_PREFIX, add_special_tokens=False)["input_ids"])
    ids = tokenizer(document, add_special_tokens=False)["input_ids"]
    windows = split_document(tokenizer, document, limit=128, overlap=16, max_windows=32)
    spans = window_spans(len(ids), 128 - prefix, 16)
    assert [(w.token_start, w.token_end) for w in windows] == spans
    for window in windows:
        assert window.text in document
        # the window's text tokenizes to exactly its span of the document
        got = tokenizer(window.text, add_special_tokens=False)["input_ids"]
        assert got == ids[window.token_start : window.token_end]
        # and, with the prefix, fits the document limit uncut
        assert not encode_document(tokenizer, window.text, 128).truncated


def test_a_document_that_fits_is_one_window_holding_it_unchanged(
    tokenizer,  # type: ignore[no-untyped-def]
) -> None:
    document = synthetic_text(50, seed=4)
    (window,) = split_document(
        tokenizer, document, limit=128, overlap=80, max_windows=1
    )
    assert window.text == document and window.token_start == 0


def test_too_many_windows_is_an_error_naming_the_document(
    tokenizer,  # type: ignore[no-untyped-def]
) -> None:
    document = synthetic_text(2000, seed=5)
    with pytest.raises(TooManyItemsError, match="more than 4 windows") as info:
        split_document(
            tokenizer,
            document,
            limit=128,
            overlap=16,
            max_windows=4,
            field="documents.7",
        )
    assert info.value.field == "documents.7"
    # a huge text is refused from a head, through the safe cut
    cut = DocumentCut.for_tokenizer(tokenizer)
    assert cut is not None
    huge = document * 400  # ~800k tokens
    with pytest.raises(TooManyItemsError):
        split_document(tokenizer, huge, limit=128, overlap=16, max_windows=4, cut=cut)


def test_a_limit_within_the_prefix_is_refused(tokenizer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(KaLMInputError, match="no room for a window"):
        split_document(tokenizer, "text", limit=2, overlap=0, max_windows=4)


def test_plan_combines_max_and_mean_per_document() -> None:
    pairs = [("q", "a"), ("q", "b")]
    spans = {"a": [(0, 10), (8, 18), (10, 20)], "b": [(0, 5)]}

    def windows(index: int, document: str):  # type: ignore[no-untyped-def]
        return [(f"{document}{k}", s) for k, s in enumerate(spans[document])]

    plan = WindowPlan.build(pairs, "max", windows)
    assert plan.pairs == [("q", "a0"), ("q", "a1"), ("q", "a2"), ("q", "b0")]
    scores = plan.combine([1.0, 3.0, 3.0, -2.0])
    assert [(s.margin, s.windows, s.best_window) for s in scores] == [
        (3.0, 3, (8, 18)),  # ties: the first best window
        (-2.0, 1, (0, 5)),
    ]
    mean = WindowPlan.build(pairs, "mean", windows).combine([1.0, 3.0, 2.0, -2.0])
    assert mean[0].margin == pytest.approx(2.0) and mean[0].best_window == (8, 18)


def test_policy_and_overlap_checks() -> None:
    assert check_long_document(None) == "truncate"
    with pytest.raises(KaLMInputError, match="long_document must be one of"):
        check_long_document("first")
    assert check_window_overlap(None) == 80
    with pytest.raises(KaLMInputError, match="window_overlap"):
        check_window_overlap(-1)


@pytest.mark.parametrize("length", [1, 3, 4, 5, 31, 33, 100, 257])
@pytest.mark.parametrize("fine", [1, 2, 4])
def test_repool_equals_pooling_at_the_coarse_size(length: int, fine: int) -> None:
    torch.manual_seed(length)
    hidden = torch.randn(1, length, 16, dtype=torch.float64)
    mask = torch.ones(1, length, dtype=torch.long)
    states, _ = mep_pool(hidden, mask, fine)
    for coarse in (c for c in (2, 4, 8, 16, 32) if c % fine == 0 and c > fine):
        direct, _ = mep_pool(hidden, mask, coarse)
        got = repool(states[0], length, fine, coarse)
        assert got.shape == (math.ceil(length / coarse), 16)
        assert torch.allclose(got.double(), direct[0], atol=1e-6)


def test_repool_refuses_a_factor_that_is_not_a_multiple() -> None:
    with pytest.raises(ValueError):
        repool(torch.zeros(3, 4), 10, 4, 6)
    with pytest.raises(ValueError):  # rows that do not match the tokens
        repool(torch.zeros(3, 4), 20, 4, 8)


def test_request_chunk_size_rules() -> None:
    assert check_request_chunk_size(None, 4) == 4
    assert check_request_chunk_size(16, 4) == 16
    assert check_request_chunk_size(8, None) == 8  # no pooling: any factor
    with pytest.raises(KaLMInputError, match="trained for Matryoshka compression"):
        check_request_chunk_size(64, 4)
    with pytest.raises(KaLMInputError, match="finer than this engine's chunk size 4"):
        check_request_chunk_size(2, 4)
    with pytest.raises(KaLMInputError, match="must be one of"):
        check_request_chunk_size(3, 1)
    with pytest.raises(KaLMInputError, match="integer"):
        check_request_chunk_size(True, 1)
