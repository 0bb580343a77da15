# SPDX-License-Identifier: Apache-2.0
import math
import re

import pytest

from kalm_t5gemma2_vllm_plugin.errors import KaLMInputError, KaLMInputTypeError
from kalm_t5gemma2_vllm_plugin.scores import rank_results, score_from_margin
from kalm_t5gemma2_vllm_plugin.validation import (
    MAX_ECHO_DEPTH,
    check_documents,
    check_pairs,
    check_positive_int,
    check_top_k,
    json_echo_problem,
    lenient_bool,
    parse_chunk_size,
)


@pytest.mark.parametrize(
    "value,expected",
    [
        (4, 4),
        ("8", 8),
        (" 32 ", 32),
        (None, None),
        ("none", None),
        ("NULL", None),
        ("", None),
    ],
    ids=["int", "str", "padded", "None", "none", "null", "empty"],
)
def test_parse_chunk_size_accepts(value: object, expected: object) -> None:
    assert parse_chunk_size(value) == expected


@pytest.mark.parametrize("value", [3, 0, 64, "four", 4.0, True], ids=str)
def test_parse_chunk_size_rejects_with_the_allowed_values(value: object) -> None:
    with pytest.raises(KaLMInputError, match=re.escape("[1, 2, 4, 8, 16, 32] or None")):
        parse_chunk_size(value, "encoder_chunk_size")


def test_positive_ints_name_the_argument() -> None:
    with pytest.raises(
        KaLMInputError, match="batch_size must be a positive int, got 0"
    ):
        check_positive_int(0, "batch_size")
    with pytest.raises(TypeError, match="max_length must be a positive int, got str"):
        check_positive_int("8", "max_length")
    with pytest.raises(TypeError):
        check_positive_int(True, "batch_size")


def test_top_k() -> None:
    assert check_top_k(None) is None and check_top_k(0) == 0
    with pytest.raises(ValueError, match="top_k must be None or an int >= 0, got -1"):
        check_top_k(-1)
    with pytest.raises(TypeError):
        check_top_k(1.5)


def test_pairs_and_documents_name_the_bad_item() -> None:
    assert check_pairs([("q", "d"), ["q2", ""]]) == [("q", "d"), ("q2", "")]
    with pytest.raises(
        KaLMInputTypeError,
        match=re.escape("pairs[1][1] (document) must be a str, got int"),
    ):
        check_pairs([("q", "d"), ("q", 3)])
    with pytest.raises(
        KaLMInputError, match=re.escape("pairs[0] must be a (query, document) pair")
    ):
        check_pairs([("q", "d", "x")])
    with pytest.raises(TypeError, match="pairs must be a list"):
        check_pairs("qd")
    with pytest.raises(
        TypeError, match=re.escape("documents[2] must be a str, got NoneType")
    ):
        check_documents(["a", "b", None])


def test_score_is_a_stable_sigmoid() -> None:
    assert score_from_margin(0.0) == 0.5
    assert score_from_margin(2.0) == pytest.approx(1 / (1 + math.exp(-2.0)), abs=0)
    assert score_from_margin(-800.0) == 0.0 and score_from_margin(800.0) == 1.0
    # float64 keeps confident scores apart where float32 would round both to 1.0
    assert score_from_margin(20.0) < score_from_margin(21.0) < 1.0


def test_rank_results_sorts_descending_with_ties_by_index() -> None:
    results = rank_results([0.5, 2.0, 0.5, -1.0], top_k=None, return_margin=True)
    assert [r["corpus_id"] for r in results] == [1, 0, 2, 3]
    assert results[0]["margin"] == 2.0
    assert [
        r["corpus_id"] for r in rank_results([1.0, 3.0], top_k=1, return_margin=False)
    ] == [1]
    assert rank_results([1.0], top_k=0, return_margin=False) == []


def _nested(depth: int) -> object:
    value: object = "x"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "value",
    [
        "id-1",
        7,
        2**80,
        -1.5,
        None,
        True,
        {"a": [1, {"b": "c"}]},
        _nested(MAX_ECHO_DEPTH),
    ],
    ids=["str", "int", "bigint", "float", "null", "bool", "object", "deepest-allowed"],
)
def test_an_echoable_json_value_has_no_problem(value: object) -> None:
    assert json_echo_problem(value) is None


@pytest.mark.parametrize(
    "value,problem",
    [
        (float("nan"), "must not hold NaN or Infinity"),
        (
            {"a": [1, float("-inf")]},
            "must not hold NaN or Infinity, which JSON cannot represent (at a.1)",
        ),
        (
            _nested(MAX_ECHO_DEPTH + 1),
            f"is nested more than {MAX_ECHO_DEPTH} levels deep",
        ),
        # far beyond the recursion limit: the check itself never recurses
        (_nested(100_000), f"is nested more than {MAX_ECHO_DEPTH} levels deep"),
        ({"k": "\ud800"}, "lone surrogate U+D800"),
    ],
    ids=["nan", "inf-inside", "one-too-deep", "very-deep", "surrogate"],
)
def test_a_json_value_that_cannot_be_echoed_says_why(
    value: object, problem: str
) -> None:
    found = json_echo_problem(value)
    assert found is not None and problem in found


@pytest.mark.parametrize(
    "given,expected",
    [
        ("true", True),
        ("False", False),
        (" TRUE ", True),
        (True, True),
        (0, 0),
        ("yes", "yes"),
        ("", ""),
    ],
    ids=[
        "true",
        "False",
        "padded",
        "bool",
        "int-unchanged",
        "yes-unchanged",
        "empty-unchanged",
    ],
)
def test_lenient_bool_reads_only_the_json_words(
    given: object, expected: object
) -> None:
    assert lenient_bool(given) == expected and type(lenient_bool(given)) is type(
        expected
    )
