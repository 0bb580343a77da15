# SPDX-License-Identifier: Apache-2.0
"""Tokenizing never stalls the server (finding F2): it runs off the event loop,
long documents are tokenized only up to a cut that keeps every kept id, and a
request's tokens are bounded (``--max-request-tokens`` -> 413)."""

from __future__ import annotations

import concurrent.futures
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, GemmaTokenizer

from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import synthetic_text
from kalm_t5gemma2_vllm_plugin.engine import requests as R
from kalm_t5gemma2_vllm_plugin.errors import TooManyItemsError
from kalm_t5gemma2_vllm_plugin.prompt import encode_document
from kalm_t5gemma2_vllm_plugin.vllm_model.config import EngineSettings
from tests.server.conftest import RunningServer, kalm_serve

MAX_REQUEST_TOKENS = 20000
# A run of one syllable: every junction sits inside some token of the tiny
# vocabulary, so no safe cut exists and it is tokenized in full (the worst case).
UNCUTTABLE_UNIT = "ab"
# Odd pieces for the exactness checks: byte-fallback runs (CJK, emoji), combining
# marks, whitespace runs, the metaspace itself, literal special tokens.
ODD = ["北", "😀", "é", "e\u0301", "  ", "\n", "\t", "▁", "<bos>", "<end_of_turn>"]


def _gemma_tokenizer() -> GemmaTokenizer:
    """Transformers' own Gemma tokenizer (its normalizer, pre-tokenizer, byte
    fallback, fused unknowns) over a small BPE trained here without word
    boundaries, so that many merges span spaces."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<end_of_turn>"]
    specials += [f"<0x{b:02X}>" for b in range(256)]
    corpus = [
        synthetic_text(60, seed=i) + ' 北京 café 😀 (x), "y".  ' for i in range(300)
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=3000, special_tokens=specials, show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    return GemmaTokenizer(
        vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]]
    )


@pytest.fixture(scope="module", params=["unigram", "gemma-bpe"])
def builder(request: pytest.FixtureRequest, tiny_checkpoint: Path) -> R.PromptBuilder:
    if request.param == "unigram":  # the test checkpoint's own tokenizer
        tokenizer: Any = AutoTokenizer.from_pretrained(tiny_checkpoint)
    else:
        tokenizer = _gemma_tokenizer()
    built = R.PromptBuilder(tokenizer, EngineSettings(), max_model_len=4096)
    assert built._cut is not None
    return built


def _documents(rng: random.Random, count: int) -> Iterator[str]:
    for i in range(count):
        words = synthetic_text(rng.randint(1, 300), seed=i).split()
        if i % 3 == 0:  # plain text
            yield " ".join(words)
        elif i % 3 == 1:  # odd pieces between words
            yield "".join(w + rng.choice([" ", *ODD]) for w in words)
        else:  # long runs of one odd piece
            run = rng.choice([*ODD, "aa"]) * rng.randint(1, 400)
            yield " ".join(words[:20]) + run + " ".join(words[20:])


def test_a_cut_document_keeps_exactly_the_untruncated_ids(
    builder: R.PromptBuilder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cut as early as possible (one character per kept token), so that most
    # documents are cut near their kept head, where a wrong cut would show.
    monkeypatch.setattr(R, "CHARS_PER_TOKEN", 1)
    assert builder._cut is not None
    rng = random.Random(0)
    cuts = 0
    for document in _documents(rng, 1500):
        limit = rng.choice([1, 2, 5, 17, 64, 257])
        full = encode_document(builder.tokenizer, document, limit)
        assert builder.encode_passage(document, limit) == (full.ids, full.truncated)
        if builder._cut.find(document, limit) is not None:
            cuts += 1
    assert cuts > 1000  # the comparison really went through cuts


def test_a_long_document_is_tokenized_only_up_to_the_cut(
    builder: R.PromptBuilder,
) -> None:
    seen: list[int] = []

    class Recording:  # the real tokenizer, noting what it is given
        def __call__(self, text: str, **kwargs: Any) -> Any:
            seen.append(len(text))
            return builder.tokenizer(text, **kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(builder.tokenizer, name)

    document = synthetic_text(300_000, seed=1)  # ~1.8 M characters
    recorded = R.PromptBuilder(Recording(), EngineSettings(), max_model_len=4096)
    ids, truncated = recorded.encode_passage(document, 1024)
    full = encode_document(builder.tokenizer, document, 1024)
    assert (ids, truncated) == (full.ids, True)
    assert max(seen) < 64 * 1024, seen


def test_pipelines_the_cut_argument_does_not_cover_are_tokenized_in_full(
    tiny_checkpoint: Path,
) -> None:
    tokenizer: Any = AutoTokenizer.from_pretrained(tiny_checkpoint)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    assert R.DocumentCut.for_tokenizer(tokenizer) is None
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    tokenizer.backend_tokenizer.normalizer = normalizers.NFKC()
    assert R.DocumentCut.for_tokenizer(tokenizer) is None


def test_tokens_beyond_max_tokens_stop_the_build_naming_the_limit(
    tiny_checkpoint: Path,
) -> None:
    tokenizer: Any = AutoTokenizer.from_pretrained(tiny_checkpoint)
    built = R.PromptBuilder(tokenizer, EngineSettings(), max_model_len=4096)
    pairs = [("q", synthetic_text(50, seed=i)) for i in range(10)]
    total = sum(p.num_tokens for p in built.build(pairs, "i"))
    assert built.build(pairs, "i", max_tokens=total)
    with pytest.raises(TooManyItemsError, match=f"at most {total - 1} tokens") as err:
        built.build(pairs, "i", max_tokens=total - 1, field="documents")
    assert err.value.field == "documents"


# --- a real server ------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    running = kalm_serve(
        tiny_checkpoint,
        tmp_path_factory.mktemp("loop"),
        "--max-body-mb",
        "40",
        "--max-request-tokens",
        str(MAX_REQUEST_TOKENS),
    )
    yield running
    assert running.stop() == 0, running.log.read_text()[-3000:]


def _timed(send: Any) -> tuple[httpx.Response, float, float]:
    """``(response, latency, completion time)``."""
    started = time.monotonic()
    response = send()
    done = time.monotonic()
    return response, done - started, done


@pytest.mark.server
def test_health_and_small_requests_answer_while_a_32_mib_body_is_tokenized(
    served: RunningServer,
) -> None:
    document = UNCUTTABLE_UNIT * ((32 * 1024 * 1024 - 64) // len(UNCUTTABLE_UNIT))
    body = ('{"query": "q", "documents": ["' + document + '"]}').encode()
    with (
        httpx.Client(base_url=served.url, trust_env=False, timeout=600) as big,
        httpx.Client(base_url=served.url, trust_env=False, timeout=60) as other,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        future = pool.submit(_timed, lambda: big.post("/rerank", content=body))
        while other.get("/health").json()["requests_in_flight"] == 0:
            assert not future.done(), future.result()[0].text
            time.sleep(0.05)
        health, health_latency, health_done = _timed(lambda: other.get("/health"))
        small, small_latency, small_done = _timed(
            lambda: other.post("/rerank", json={"query": "q", "documents": ["a b"]})
        )
        response, big_latency, big_done = future.result()
    assert health.status_code == 200 and small.status_code == 200, small.text
    assert response.status_code == 200, response.text[:500]
    assert response.json()["meta"]["truncated"] == [0]
    assert health_done < big_done and small_done < big_done
    print(
        f"\n32 MiB uncuttable document: {big_latency:.1f} s; meanwhile /health "
        f"{health_latency * 1000:.0f} ms, small /rerank {small_latency * 1000:.0f} ms"
    )


@pytest.mark.server
def test_an_ordinary_32_mib_document_is_cut_before_tokenizing(
    served: RunningServer,
) -> None:
    document = synthetic_text(6_000_000, seed=2)[: 32 * 1024 * 1024 - 64]
    with httpx.Client(base_url=served.url, trust_env=False, timeout=600) as http:
        response, latency, _ = _timed(
            lambda: http.post("/rerank", json={"query": "q", "documents": [document]})
        )
    assert response.status_code == 200, response.text[:500]
    assert response.json()["meta"]["truncated"] == [0]
    print(f"\n{len(document) / 2**20:.0f} MiB ordinary document: {latency:.2f} s")


@pytest.mark.server
def test_a_request_over_max_request_tokens_gets_413_naming_the_limit(
    served: RunningServer,
) -> None:
    documents = [synthetic_text(1500, seed=i) for i in range(20)]  # ~1.1k each
    with httpx.Client(base_url=served.url, trust_env=False, timeout=120) as http:
        response = http.post("/rerank", json={"query": "q", "documents": documents})
        fits = http.post("/rerank", json={"query": "q", "documents": documents[:5]})
        limits = http.get("/health").json()["limits"]
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["type"] == "too_many_items" and error["field"] == "documents"
    assert f"at most {MAX_REQUEST_TOKENS} tokens" in error["message"]
    assert fits.status_code == 200
    assert limits["max_request_tokens"] == MAX_REQUEST_TOKENS
