# SPDX-License-Identifier: Apache-2.0
"""Tests that share one float32 engine (the module-scoped ``engine`` fixture)."""

import random
import re
from importlib import resources

import pytest

from kalm_t5gemma2_vllm_plugin import KaLMVLLMReranker
from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import synthetic_text
from kalm_t5gemma2_vllm_plugin.prompt import decoder_prompt_ids
from kalm_t5gemma2_vllm_plugin.rerankers.reference import KaLMReranker
from tests.helpers import BATCH_ATOL, MARGIN_ATOL, QUERY, fidelity_documents

pytestmark = pytest.mark.engine


def test_a_pair_scores_the_same_alone_and_among_fifty(engine: KaLMVLLMReranker) -> None:
    rng = random.Random(3)
    others = [
        (
            synthetic_text(rng.randint(1, 40), seed=500 + i),
            synthetic_text(rng.randint(0, 300), seed=600 + i),
        )
        for i in range(50)
    ]
    target = (QUERY, synthetic_text(90, seed=4242))
    alone = engine.margins([target])[0]
    mixed = engine.margins(others[:25] + [target] + others[25:])[25]
    assert abs(alone - mixed) <= BATCH_ATOL
    # and the mixed batch itself matches the reference
    expected = KaLMReranker(engine.model_path, dtype="float32").margins(others)
    got = engine.margins(others)
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) <= MARGIN_ATOL


def test_recurring_passages_are_encoded_once(engine: KaLMVLLMReranker) -> None:
    docs = [synthetic_text(20 + i, seed=9000 + i) for i in range(10)]
    before = engine.stats()
    first = engine.rank(QUERY, docs, return_margin=True)
    second = engine.rank("Which city is the capital?", docs, return_margin=True)
    after = engine.stats()
    assert after["passages_encoded"] - before["passages_encoded"] == 10
    assert after["requests_scored"] - before["requests_scored"] == 20
    assert [r["margin"] for r in first] != [r["margin"] for r in second]


def test_llm_score_agrees_with_predict(engine: KaLMVLLMReranker) -> None:
    docs = list(fidelity_documents().values())
    for query in (QUERY, synthetic_text(600, seed=5)):  # the second one gets truncated
        expected = engine.predict([(query, doc) for doc in docs])
        outputs = engine.llm.score(query, docs, use_tqdm=False)
        got = [o.outputs.score for o in outputs]
        assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) <= 1e-6


def test_score_template_passes_a_per_request_instruction(
    engine: KaLMVLLMReranker,
) -> None:
    from vllm import PoolingParams

    template = (
        resources.files("kalm_t5gemma2_vllm_plugin")
        .joinpath("data/kalm_score_template.jinja")
        .read_text(encoding="utf-8")
    )
    instruction = "Given a web search query, retrieve passages that answer the query."
    docs = ["The capital of China is Beijing.", "Gravity attracts bodies."]
    params = PoolingParams(
        extra_kwargs={"chat_template_kwargs": {"instruction": instruction}}
    )
    outputs = engine.llm.score(
        QUERY, docs, chat_template=template, pooling_params=params, use_tqdm=False
    )
    got = [o.outputs.score for o in outputs]
    expected = engine.predict([(QUERY, d) for d in docs], instruction=instruction)
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) <= 1e-6
    default = engine.predict([(QUERY, d) for d in docs])
    assert got != pytest.approx(default, abs=1e-6)


def test_plain_classify_returns_p_yes(engine: KaLMVLLMReranker) -> None:
    ids = decoder_prompt_ids(engine.tokenizer, QUERY, query_max_length=512)
    docs = ["The capital of China is Beijing.", ""]
    outputs = engine.llm.classify(
        [{"prompt_token_ids": ids, "multi_modal_data": {"passage": d}} for d in docs],
        use_tqdm=False,
    )
    expected = engine.predict([(QUERY, d) for d in docs])
    assert [o.outputs.probs[0] for o in outputs] == pytest.approx(expected, abs=1e-6)


def test_calls_validate_like_the_reference(
    engine: KaLMVLLMReranker, reference: KaLMReranker
) -> None:
    bad_calls = [
        (lambda r: r.rank(1, ["d"]), TypeError, "query must be a str, got int"),
        (
            lambda r: r.rank("q", ["d", 2]),
            TypeError,
            "documents[1] must be a str, got int",
        ),
        (
            lambda r: r.rank("q", ["d"], top_k=-1),
            ValueError,
            "top_k must be None or an int",
        ),
        (
            lambda r: r.predict([("q",)]),
            ValueError,
            "pairs[0] must be a (query, document)",
        ),
        (
            lambda r: r.predict([("q", "d")], instruction=5),
            TypeError,
            "instruction must be a str, got int",
        ),
    ]
    for call, error, message in bad_calls:
        for reranker in (engine, reference):
            with pytest.raises(error, match=re.escape(message)):
                call(reranker)


def test_rank_and_predict_shapes(engine: KaLMVLLMReranker) -> None:
    docs = ["The capital of China is Beijing.", "alpha", "alpha", ""]
    ranked = engine.rank(QUERY, docs, return_margin=True)
    assert sorted(r["corpus_id"] for r in ranked) == [0, 1, 2, 3]
    margins = [r["margin"] for r in ranked]
    assert margins == sorted(margins, reverse=True)
    ids = [r["corpus_id"] for r in ranked]
    assert ids.index(1) < ids.index(2)  # equal documents keep input order
    assert set(ranked[0]) == {"corpus_id", "score", "margin"}
    assert set(engine.rank(QUERY, docs)[0]) == {"corpus_id", "score"}
    assert len(engine.rank(QUERY, docs, top_k=2)) == 2
    assert engine.rank(QUERY, docs, top_k=0) == [] and engine.rank(QUERY, []) == []
    assert engine.predict([]) == []
    scores = engine.predict([(QUERY, d) for d in docs])
    with_margin = engine.predict([(QUERY, d) for d in docs], return_margin=True)
    assert scores == [r["score"] for r in with_margin]
