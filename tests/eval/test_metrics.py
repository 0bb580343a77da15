# SPDX-License-Identifier: Apache-2.0
"""The metrics of a 3-query toy run, computed by hand, equal the tool's; and
pytrec-eval-terrier (trec_eval's own code) agrees on the same files."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from kalm_t5gemma2_vllm_plugin.evaluation.beir import read_qrels
from kalm_t5gemma2_vllm_plugin.evaluation.metrics import (
    METRICS,
    compare_runs,
    evaluate_run,
)
from kalm_t5gemma2_vllm_plugin.evaluation.runs import read_run

TOLERANCE = 1e-9

#: Graded labels; relevant means label >= 1.
QRELS = {
    "q1": {"d1": 2, "d2": 1, "d3": 0, "d4": 1},  # 3 relevant; d4 never retrieved
    "q2": {"d5": 1, "d6": 0},  # 1 relevant, retrieved at rank 12
    "q3": {"d7": 2, "d8": 2, "d9": 1},  # 3 relevant; d8 never retrieved
}
#: Ranked lists, best first (scores strictly decreasing: no ties to break).
RANKINGS = {
    "q1": ["d3", "d1", "x1", "d2"],
    "q2": ["d6", *(f"y{i}" for i in range(1, 11)), "d5"],
    "q3": ["d9", "d7"],
}


def _g(rank: int) -> float:
    """The discount of trec_eval's ndcg_cut: log2(rank + 1)."""
    return math.log2(rank + 1)


def _by_hand() -> dict[str, float]:
    ndcg = {
        # DCG: d1 (2) at rank 2, d2 (1) at rank 4; ideal: gains 2, 1, 1.
        "q1": (2 / _g(2) + 1 / _g(4)) / (2 / _g(1) + 1 / _g(2) + 1 / _g(3)),
        "q2": 0.0,  # the one relevant document is at rank 12, beyond 10
        # DCG: d9 (1) at rank 1, d7 (2) at rank 2; ideal: gains 2, 2, 1.
        "q3": (1 / _g(1) + 2 / _g(2)) / (2 / _g(1) + 2 / _g(2) + 1 / _g(3)),
    }
    mrr = {"q1": 1 / 2, "q2": 0.0, "q3": 1 / 1}  # first relevant within 10
    recall_10 = {"q1": 2 / 3, "q2": 0 / 1, "q3": 2 / 3}
    recall_100 = {"q1": 2 / 3, "q2": 1 / 1, "q3": 2 / 3}
    average_precision = {
        "q1": (1 / 2 + 2 / 4) / 3,  # relevant at ranks 2 and 4, of 3 relevant
        "q2": (1 / 12) / 1,
        "q3": (1 / 1 + 2 / 2) / 3,
    }
    per_metric = {
        "ndcg@10": ndcg,
        "mrr@10": mrr,
        "recall@10": recall_10,
        "recall@100": recall_100,
        "map": average_precision,
    }
    return {m: sum(values.values()) / 3 for m, values in per_metric.items()}


def _write_toy(directory: Path) -> tuple[Path, Path, Path]:
    """The toy run as BEIR qrels, a TREC run, and TREC qrels for pytrec_eval."""
    qrels = directory / "qrels.tsv"
    qrels.write_text(
        "query-id\tcorpus-id\tscore\n"
        + "".join(
            f"{q}\t{d}\t{g}\n" for q, docs in QRELS.items() for d, g in docs.items()
        )
    )
    trec_qrels = directory / "qrels.trec"
    trec_qrels.write_text(
        "".join(
            f"{q} 0 {d} {g}\n" for q, docs in QRELS.items() for d, g in docs.items()
        )
    )
    run = directory / "run.trec"
    run.write_text(
        "".join(
            f"{q} Q0 {d} {rank} {100 - rank}.5 toy\n"
            for q, docs in RANKINGS.items()
            for rank, d in enumerate(docs, start=1)
        )
    )
    return qrels, run, trec_qrels


def test_toy_run_metrics_equal_the_hand_computed_values(tmp_path: Path) -> None:
    qrels_path, run_path, _ = _write_toy(tmp_path)
    qrels = read_qrels(qrels_path)
    run = read_run(run_path, QRELS).scores
    means, per_query = evaluate_run(qrels, run)
    expected = _by_hand()
    assert set(means) == set(METRICS)
    for metric in METRICS:
        assert means[metric] == pytest.approx(expected[metric], abs=TOLERANCE), metric
    assert per_query["ndcg@10"]["q2"] == 0.0
    assert per_query["recall@100"]["q2"] == pytest.approx(1.0, abs=TOLERANCE)


def test_pytrec_eval_agrees_on_the_same_files(tmp_path: Path) -> None:
    pytrec_eval = pytest.importorskip("pytrec_eval")
    qrels_path, run_path, trec_qrels = _write_toy(tmp_path)
    means, _ = evaluate_run(read_qrels(qrels_path), read_run(run_path, QRELS).scores)
    with open(trec_qrels) as f:
        qrels = pytrec_eval.parse_qrel(f)
    with open(run_path) as f:
        run = pytrec_eval.parse_run(f)
    measures = {"ndcg_cut_10", "recall_10", "recall_100", "map"}
    full = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    # trec_eval's recip_rank has no cutoff: MRR@10 is recip_rank of the top 10.
    top_10 = {
        q: dict(sorted(docs.items(), key=lambda kv: -kv[1])[:10])
        for q, docs in run.items()
    }
    cut = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top_10)
    theirs = {
        "ndcg@10": [full[q]["ndcg_cut_10"] for q in QRELS],
        "mrr@10": [cut[q]["recip_rank"] for q in QRELS],
        "recall@10": [full[q]["recall_10"] for q in QRELS],
        "recall@100": [full[q]["recall_100"] for q in QRELS],
        "map": [full[q]["map"] for q in QRELS],
    }
    for metric, values in theirs.items():
        assert means[metric] == pytest.approx(sum(values) / 3, abs=TOLERANCE), metric


def test_a_query_without_candidates_scores_zero() -> None:
    means, per_query = evaluate_run(
        {"q1": {"d1": 1}, "q2": {"d2": 1}}, {"q1": {"d1": 3.0}}
    )
    assert per_query["ndcg@10"] == {"q1": 1.0, "q2": 0.0}
    assert means["map"] == pytest.approx(0.5, abs=TOLERANCE)


def test_ties_are_evaluated_in_written_order_by_document_id() -> None:
    # d1 and d2 tie; the run is written (and evaluated) d1 first.
    _, per_query = evaluate_run({"q1": {"d1": 1}}, {"q1": {"d2": 0.5, "d1": 0.5}})
    assert per_query["mrr@10"]["q1"] == 1.0
    _, per_query = evaluate_run({"q1": {"d2": 1}}, {"q1": {"d2": 0.5, "d1": 0.5}})
    assert per_query["mrr@10"]["q1"] == 0.5


def test_fisher_p_values_are_one_for_identical_runs_and_small_for_a_clear_win() -> None:
    qrels = {f"q{i}": {"good": 1} for i in range(20)}
    worse = {q: {"bad": 2.0, "good": 1.0} for q in qrels}
    better = {q: {"good": 2.0, "bad": 1.0} for q in qrels}
    same = compare_runs(qrels, worse, {"reranked": worse})["reranked"]
    assert all(p == 1.0 for p in same.values())
    win = compare_runs(qrels, worse, {"reranked": better})["reranked"]
    assert win["mrr@10"] < 0.01 and win["ndcg@10"] < 0.01
    assert win["recall@10"] == 1.0  # the same documents: nothing to test


def test_numba_stays_out_of_the_callers_process() -> None:
    # vLLM 0.32 cannot start an engine in a process that has imported numba
    # (ranx's and bm25s's backend): the work runs in a helper process.
    code = (
        "import sys\n"
        "from kalm_t5gemma2_vllm_plugin.evaluation import bm25_run, evaluate_run\n"
        "from kalm_t5gemma2_vllm_plugin.evaluation import compare_runs\n"
        "run = bm25_run({'d1': 'iron rusts', 'd2': 'bees'}, {'q1': 'iron'}, 5)\n"
        "assert run == {'q1': {'d1': run['q1']['d1']}}, run\n"
        "means, _ = evaluate_run({'q1': {'d1': 1}}, run)\n"
        "assert means['ndcg@10'] == 1.0, means\n"
        "compare_runs({'q1': {'d1': 1}}, run, {'reranked': run})\n"
        "assert not {'numba', 'llvmlite'} & set(sys.modules), 'numba imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
