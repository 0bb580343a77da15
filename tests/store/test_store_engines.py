# SPDX-License-Identifier: Apache-2.0
"""Store tests that build their own engines (none may outlive another; see the
root conftest), so they live apart from the module-engine tests."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kalm_t5gemma2_vllm_plugin import DocumentId, KaLMVLLMReranker
from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import synthetic_text
from kalm_t5gemma2_vllm_plugin.errors import KaLMConfigError
from kalm_t5gemma2_vllm_plugin.store.encoder import PassageEncoder
from kalm_t5gemma2_vllm_plugin.store.format import PassageStore, text_sha256
from tests.helpers import QUERY, corpus_docs, run_encode, write_corpus

pytestmark = pytest.mark.engine


def test_decoder_only_mode_needs_no_encoder_and_refuses_text(
    tiny_checkpoint: Path, store: Path
) -> None:
    with pytest.raises(ValueError, match="decoder_only=True needs a passage_store"):
        KaLMVLLMReranker(str(tiny_checkpoint), decoder_only=True)
    with KaLMVLLMReranker(
        str(tiny_checkpoint),
        dtype="float32",
        decoder_only=True,
        passage_store=str(store),
    ) as reranker:
        ranked = reranker.rank(QUERY, document_ids=list(corpus_docs()))
        assert len(ranked) == len(corpus_docs())
        assert reranker.stats()["passages_encoded"] == 0
        with pytest.raises(ValueError, match="runs decoder-only"):
            reranker.rank(QUERY, ["some text"])


def test_a_store_killed_mid_write_stays_readable_and_a_rerun_completes_it(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    docs = {
        f"p{i}": synthetic_text(20 + (i % 13) * 9, seed=200 + i) for i in range(240)
    }
    corpus = write_corpus(tmp_path / "corpus.jsonl", docs)
    store = tmp_path / "store"
    encoder = PassageEncoder(
        str(tiny_checkpoint), chunk_size=4, dtype="float32", document_max_length=1024
    )
    rng = random.Random(1234)
    kills = 0
    for _ in range(4):
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kalm_t5gemma2_vllm_plugin.cli.encode",
                "--model",
                str(tiny_checkpoint),
                "--input",
                str(corpus),
                "--store",
                str(store),
                "--batch-size",
                "2",
                "--dtype",
                "float32",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        # Kill by progress, not by time: after a random number of committed
        # batches (at most a third of what is left), so each run dies mid-write
        # however fast this machine encodes.
        held_before = _held(store)
        left = len(docs) - held_before
        target = held_before + rng.randint(1, max(1, left // 3))
        deadline = time.monotonic() + 120
        while (
            _held(store) < target
            and process.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.005)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
        process.stdout.close()  # type: ignore[union-attr]
        process.stderr.close()  # type: ignore[union-attr]
        _check_every_held_passage(store, docs, encoder)
    assert kills >= 2, "the encoder finished before it could be killed"
    result = json.loads(run_encode(tiny_checkpoint, corpus, store).stdout)
    assert result["encoded"] == len(docs) - result["skipped"]
    assert _held(store) == len(docs)
    _check_every_held_passage(store, docs, encoder)
    with KaLMVLLMReranker(
        str(tiny_checkpoint),
        dtype="float32",
        passage_store=str(store),
        decoder_only=True,
    ) as reranker:
        sample = list(docs)[::20]
        by_id = reranker.margins([(QUERY, DocumentId(i)) for i in sample])
    with KaLMVLLMReranker(str(tiny_checkpoint), dtype="float32") as reranker:
        by_text = reranker.margins([(QUERY, docs[i]) for i in sample])
    assert max(abs(a - b) for a, b in zip(by_id, by_text, strict=True)) <= 1e-5


def _held(store: Path) -> int:
    try:
        reader = PassageStore(store)
    except KaLMConfigError:
        return 0
    try:
        return len(reader)
    finally:
        reader.close()


def _check_every_held_passage(
    store: Path, docs: dict[str, str], encoder: PassageEncoder
) -> None:
    if not (store / "index.sqlite").exists():
        return
    reader = PassageStore(store)
    ids = reader.ids()
    records = reader.records(ids)
    states = reader.get(ids)
    fresh = encoder.encode([docs[i] for i in ids])
    for record, held, (expected, tokens, _, key) in zip(
        records, states, fresh, strict=True
    ):
        assert record.text_sha256 == text_sha256(docs[record.id])
        assert record.num_tokens == tokens and record.rows == len(held)
        assert record.passage_key == key
        # batch composition differs from the encoding run: float noise only
        torch.testing.assert_close(held, expected, rtol=1e-5, atol=1e-5)
    reader.close()
