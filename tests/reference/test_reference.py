# SPDX-License-Identifier: Apache-2.0
import random
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, T5Gemma2ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput

from kalm_t5gemma2_vllm_plugin import prompt as prompting
from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import synthetic_text
from kalm_t5gemma2_vllm_plugin.errors import KaLMConfigError
from kalm_t5gemma2_vllm_plugin.rerankers.reference import KaLMReranker
from kalm_t5gemma2_vllm_plugin.scores import score_from_margin
from tests.helpers import BATCH_ATOL, QUERY, fidelity_documents


def _mixed_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [
        (
            synthetic_text(rng.randint(1, 30), seed=seed + i),
            synthetic_text(rng.randint(0, 160), seed=1000 + seed + i),
        )
        for i in range(count)
    ]


def test_scores_are_probabilities_and_sigmoid_of_margins(
    reference: KaLMReranker,
) -> None:
    pairs = [(QUERY, doc) for doc in fidelity_documents().values()]
    results = reference.predict(pairs, return_margin=True)
    scores = reference.predict(pairs)
    for result, score in zip(results, scores, strict=True):
        assert 0.0 < result["score"] < 1.0
        assert result["score"] == score_from_margin(result["margin"]) == score
    assert len({round(r["margin"], 3) for r in results}) == len(results)  # not constant


def test_matches_a_hand_written_model_card_forward(tiny_checkpoint: Path) -> None:
    """The reference equals the model card's steps written out by hand (chunk 2)."""
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    model = T5Gemma2ForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    doc = "The capital of China is Beijing."
    enc = tok("<Document>: " + doc, add_special_tokens=False, return_tensors="pt")
    dec_text = prompting.format_decoder_prompt(QUERY)
    dec = tok(dec_text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        hidden = model.get_encoder()(**enc).last_hidden_state[0]
        pooled = torch.stack(
            [hidden[i : i + 2].mean(0) for i in range(0, len(hidden), 2)]
        )
        logits = (
            model(
                encoder_outputs=BaseModelOutput(last_hidden_state=pooled[None]),
                attention_mask=torch.ones(1, len(pooled), dtype=torch.long),
                decoder_input_ids=dec["input_ids"],
            )
            .logits[0, -1]
            .float()
        )
    expected = float(logits[4443] - logits[1904])
    got = KaLMReranker(str(tiny_checkpoint), chunk_size=2, dtype="float32").margins(
        [(QUERY, doc)]
    )[0]
    assert got == pytest.approx(expected, abs=1e-5)


def test_rank_sorts_by_score_with_ties_by_index(reference: KaLMReranker) -> None:
    docs = ["alpha beta", "The capital of China is Beijing.", "alpha beta", "x"]
    results = reference.rank(QUERY, docs, return_margin=True)
    margins = [r["margin"] for r in results]
    assert margins == sorted(margins, reverse=True)
    ids = [r["corpus_id"] for r in results]
    assert ids.index(0) < ids.index(2)  # equal documents keep input order
    assert [r["corpus_id"] for r in reference.rank(QUERY, docs, top_k=2)] == ids[:2]
    assert reference.rank(QUERY, docs, top_k=0) == []
    assert reference.rank(QUERY, []) == []


def test_predict_does_not_depend_on_batch_size(reference: KaLMReranker) -> None:
    pairs = _mixed_pairs(40)
    one = reference.predict(pairs, batch_size=1)
    many = reference.predict(pairs, batch_size=32)
    assert max(abs(a - b) for a, b in zip(one, many, strict=True)) <= 1e-6


def test_a_pair_alone_scores_as_in_a_mixed_batch(reference: KaLMReranker) -> None:
    pairs = _mixed_pairs(20, seed=5)
    target = (QUERY, synthetic_text(70, seed=9))
    alone = reference.margins([target])[0]
    batched = reference.margins(pairs[:10] + [target] + pairs[10:], batch_size=32)[10]
    assert abs(alone - batched) <= BATCH_ATOL


def test_sliding_window_shorter_than_documents(window_checkpoint: Path) -> None:
    reranker = KaLMReranker(str(window_checkpoint), chunk_size=4, dtype="float32")
    assert reranker.model.config.encoder.text_config.sliding_window == 6
    pairs = [(QUERY, synthetic_text(n, seed=n)) for n in (3, 40, 150)]
    alone = [reranker.margins([p])[0] for p in pairs]
    together = reranker.margins(pairs)
    assert max(abs(a - b) for a, b in zip(alone, together, strict=True)) <= BATCH_ATOL
    assert all(torch.isfinite(torch.tensor(together)))


def test_instruction_changes_the_score(reference: KaLMReranker) -> None:
    pair = [(QUERY, "The capital of China is Beijing.")]
    default = reference.margins(pair)[0]
    other = reference.margins(
        pair,
        instruction="Given a web search query, retrieve "
        "passages that answer the query.",
    )[0]
    assert default != other


def test_chunk_size_none_equals_one(tiny_checkpoint: Path) -> None:
    pairs = [(QUERY, doc) for doc in fidelity_documents().values()]
    none = KaLMReranker(str(tiny_checkpoint), chunk_size=None, dtype="float32").margins(
        pairs
    )
    one = KaLMReranker(str(tiny_checkpoint), chunk_size=1, dtype="float32").margins(
        pairs
    )
    assert max(abs(a - b) for a, b in zip(none, one, strict=True)) <= 1e-5


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (
            {"chunk_size": 3},
            ValueError,
            "chunk_size must be one of [1, 2, 4, 8, 16, 32]",
        ),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive int, got 0"),
        ({"max_length": -1}, ValueError, "max_length must be a positive int, got -1"),
        (
            {"query_max_length": "512"},
            TypeError,
            "query_max_length must be a positive int",
        ),
        ({"instruction": None}, TypeError, "instruction must be a str, got NoneType"),
    ],
    ids=["chunk", "batch", "max_length", "query_max_length", "instruction"],
)
def test_constructor_validates(
    tiny_checkpoint: Path, kwargs: dict, error: type, message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        KaLMReranker(str(tiny_checkpoint), dtype="float32", **kwargs)


def test_calls_validate(reference: KaLMReranker) -> None:
    with pytest.raises(TypeError, match=re.escape("query must be a str, got int")):
        reference.rank(1, ["d"])  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=re.escape("documents[0] must be a str, got bytes")
    ):
        reference.rank("q", [b"d"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="top_k must be None or an int >= 0, got -2"):
        reference.rank("q", ["d"], top_k=-2)
    with pytest.raises(TypeError, match=re.escape("pairs[0][0] (query) must be a str")):
        reference.predict([(None, "d")])  # type: ignore[list-item]
    assert reference.predict([]) == []


def test_missing_model_fails_in_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(
        KaLMConfigError,
        match="is not a local directory and could not be "
        "fetched from the Hugging Face Hub",
    ):
        KaLMReranker("KaLM-Embedding/does-not-exist-here", dtype="float32")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KaLMConfigError, match="has no config.json"):
        KaLMReranker(str(tmp_path / "empty"), dtype="float32")
