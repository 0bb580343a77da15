# SPDX-License-Identifier: Apache-2.0
"""``kalm-vllm-eval`` end to end, each run a real process with its own engine
(the tiny checkpoint, float32): with BM25 and with a run file, and resumed
after SIGKILL into a byte-identical run file. Four engine starts in all.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kalm_t5gemma2_vllm_plugin.evaluation import (
    bm25_run,
    evaluate_run,
    format_trec,
    read_corpus,
    read_qrels,
    read_queries,
    read_run,
    top_candidates,
)
from kalm_t5gemma2_vllm_plugin.evaluation.journal import JOURNAL_NAME

pytestmark = [pytest.mark.eval, pytest.mark.engine, pytest.mark.slow]

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "beir-fixture"
QUERIES = read_queries(FIXTURE / "queries.jsonl")
QRELS = read_qrels(FIXTURE / "qrels" / "test.tsv")
#: Queries journaled before the kill.
KILL_AFTER = 3
TIMEOUT_S = 600


def _command(checkpoint: Path, output: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kalm_t5gemma2_vllm_plugin.cli.eval",
        str(FIXTURE),
        "--model",
        str(checkpoint),
        "--dtype",
        "float32",
        "--output",
        str(output),
        *extra,
    ]


def _run_cli(command: list[str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _report(output: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((output / "report.json").read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def bm25_output(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """``kalm-vllm-eval DATA_DIR`` with no first stage: BM25, depth 100."""
    output = tmp_path_factory.mktemp("eval-bm25") / "out"
    return output, _run_cli(_command(tiny_checkpoint, output))


def _journaled(output: Path) -> int:
    try:
        data = (output / JOURNAL_NAME).read_bytes()
    except FileNotFoundError:
        return 0
    return max(data.count(b"\n") - 1, 0)  # whole lines, less the header


def test_cli_with_bm25_end_to_end(
    bm25_output: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    output, done = bm25_output
    report = _report(output)
    assert report["first_stage"]["source"] == "bm25"
    assert report["first_stage"]["depth"] == 100
    assert report["queries_evaluated"] == 30
    assert report["dataset"]["queries_skipped"] == 2
    assert report["queries_scored_this_run"] == report["queries_reranked"] == 30
    assert any("Recall@100 of the reranked run equals" in n for n in report["notes"])
    # the CLI turns the passage cache off: each query from a fresh state
    assert report["fresh_state_per_query"] is True
    assert report["engine"]["passage_cache_mb"] == 0
    # the first-stage file is BM25's top 100, in the documented order
    corpus = read_corpus(FIXTURE / "corpus.jsonl")
    bm25 = top_candidates(bm25_run(corpus, {q: QUERIES[q] for q in QRELS}, 100), 100)
    expected = "".join(
        format_trec({q: dict(docs) for q, docs in bm25.items()}, "first-stage")
    )
    assert (output / "run.first_stage.trec").read_text() == expected
    # metrics are those of the written files; Recall@100 is equal by construction
    first = read_run(output / "run.first_stage.trec", QUERIES).scores
    reranked = read_run(output / "run.reranked.trec", QUERIES).scores
    assert {q: set(d) for q, d in first.items()} == {
        q: set(d) for q, d in reranked.items()
    }
    for name, run in (("first_stage", first), ("reranked", reranked)):
        means, _ = evaluate_run(QRELS, run)
        for metric, value in means.items():
            assert report["metrics"][name][metric] == pytest.approx(value, abs=1e-9)
    metrics = report["metrics"]
    assert metrics["reranked"]["recall@100"] == metrics["first_stage"]["recall@100"]
    assert set(report["significance"]["p_values"]["reranked"]) == set(
        metrics["reranked"]
    )
    # report.md is printed on stdout; the plot is a PNG
    assert done.stdout == (output / "report.md").read_text()
    assert "| nDCG@10 |" in done.stdout and "Fisher" in done.stdout
    assert (output / "ndcg_per_query.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Traceback" not in done.stderr


def test_cli_with_a_run_file_end_to_end(tiny_checkpoint: Path, tmp_path: Path) -> None:
    run = FIXTURE / "run.dice.trec"
    output = tmp_path / "out"
    _run_cli(_command(tiny_checkpoint, output, "--run", str(run), "--depth", "20"))
    report = _report(output)
    dice = read_run(run, QUERIES).scores
    cut = top_candidates({q: dice.get(q, {}) for q in QRELS}, 20)
    expected = "".join(format_trec({q: dict(d) for q, d in cut.items()}, "first-stage"))
    assert (output / "run.first_stage.trec").read_text() == expected
    assert report["first_stage"]["source"] == "run"
    without = sum(1 for docs in cut.values() if not docs)
    assert without >= 1  # the fixture's run misses a judged query on purpose
    assert report["dataset"]["queries_without_candidates"] == without
    assert report["queries_reranked"] == 30 - without
    assert report["pairs_scored"] == sum(len(d) for d in cut.values())
    assert "has no first-stage candidates" in (output / "report.md").read_text()


def test_cli_resumes_after_sigkill_into_a_byte_identical_run(
    bm25_output: tuple[Path, subprocess.CompletedProcess[str]],
    tiny_checkpoint: Path,
    tmp_path: Path,
) -> None:
    reference, _ = bm25_output
    output = tmp_path / "out"
    command = _command(tiny_checkpoint, output)
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while _journaled(output) < KILL_AFTER:
            assert process.poll() is None, process.communicate()[1][-4000:]
            assert time.monotonic() < deadline, "no query journaled in time"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.communicate()
    assert process.returncode == -signal.SIGKILL
    killed_at = _journaled(output)
    assert KILL_AFTER <= killed_at < 30, killed_at
    assert not (output / "run.reranked.trec").exists()

    _run_cli(command)
    report = _report(output)
    assert report["queries_resumed"] == killed_at
    assert report["queries_scored_this_run"] == 30 - killed_at
    assert (output / "run.reranked.trec").read_bytes() == (
        reference / "run.reranked.trec"
    ).read_bytes()
    assert (output / "run.first_stage.trec").read_bytes() == (
        reference / "run.first_stage.trec"
    ).read_bytes()
