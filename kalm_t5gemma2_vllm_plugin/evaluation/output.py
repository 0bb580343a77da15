# SPDX-License-Identifier: Apache-2.0
"""What an evaluation leaves in its output directory, from the journal's runs.

``run.first_stage.trec`` (the candidates: the first stage cut to ``depth``),
``run.reranked.trec`` (or ``run.reranked.chunkN.trec`` per size of a sweep),
``report.json``, ``report.md`` and ``ndcg_per_query.png`` (or
``chunk_size_sweep.png``); every file is written under a temporary name and
renamed into place.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from kalm_t5gemma2_vllm_plugin.evaluation.beir import DOCUMENT_TEXT_RULE
from kalm_t5gemma2_vllm_plugin.evaluation.metrics import (
    METRICS,
    PERMUTATIONS,
    SEED,
    compare_runs,
    evaluate_run,
)
from kalm_t5gemma2_vllm_plugin.evaluation.report import depth_notes, markdown_report
from kalm_t5gemma2_vllm_plugin.evaluation.rerank import RerankStats
from kalm_t5gemma2_vllm_plugin.evaluation.runs import Run, write_atomic, write_trec

if TYPE_CHECKING:
    from kalm_t5gemma2_vllm_plugin.evaluation.api import EvalPlan

__all__ = ["REPORT_VERSION", "write_outputs"]

REPORT_VERSION = 1
_TAG = "kalm-vllm-eval"


def _run_file(name: str) -> str:
    if name == "reranked":
        return "run.reranked.trec"
    return f"run.reranked.chunk{name.removeprefix('chunk_size=')}.trec"


def _metrics(
    plan: EvalPlan, first_stage: Run, reranked: dict[str, Run]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, float]]]:
    """``(means by run, p-values by run, nDCG@10 per query by run)``."""
    means, per_query = {}, {}
    for name, run in {"first_stage": first_stage, **reranked}.items():
        means[name], by_metric = evaluate_run(plan.qrels, run)
        per_query[name] = by_metric["ndcg@10"]
    p_values = compare_runs(plan.qrels, first_stage, reranked)
    return means, p_values, per_query


def _plot(
    plan: EvalPlan,
    means: dict[str, Any],
    per_query: dict[str, dict[str, float]],
) -> str:
    from kalm_t5gemma2_vllm_plugin.evaluation.plot import (
        plot_chunk_size_sweep,
        plot_per_query,
    )

    title = f"{plan.dataset.root.name} ({plan.dataset.split}), depth {plan.depth}"
    if plan.chunk_sizes is None:
        path = plan.output / "ndcg_per_query.png"
        plot_per_query(per_query["first_stage"], per_query["reranked"], path, title)
    else:
        path = plan.output / "chunk_size_sweep.png"
        plot_chunk_size_sweep(means, plan.chunk_sizes, path, title)
    return path.name


def write_outputs(
    plan: EvalPlan,
    engine: dict[str, Any],
    reranked: dict[str, Run],
    stats: RerankStats,
    *,
    resumed: int,
    plot: bool,
    timings: dict[str, float],
) -> dict[str, Any]:
    """Write the runs, the metrics, both reports and the plot; the report dict."""
    first_stage: Run = {q: dict(docs) for q, docs in plan.candidates.items()}
    files = {"first_stage": "run.first_stage.trec"}
    write_trec(plan.output / files["first_stage"], first_stage, "first-stage")
    for name, run in reranked.items():
        files[name] = _run_file(name)
        write_trec(plan.output / files[name], run, _TAG)
    means, p_values, per_query = _metrics(plan, first_stage, reranked)
    if plot:
        files["plot"] = _plot(plan, means, per_query)
    files.update(report_json="report.json", report_md="report.md")
    files["journal"] = "journal.jsonl"
    reranked_queries = sum(1 for docs in plan.candidates.values() if docs)
    evaluated, known = len(plan.qrels), len(plan.queries)
    report: dict[str, Any] = {
        "kalm_eval_report": REPORT_VERSION,
        "dataset": {
            "path": str(plan.dataset.root),
            "name": plan.dataset.root.resolve().name,
            "split": plan.dataset.split,
            "queries_in_queries_jsonl": known,
            "queries_evaluated": evaluated,
            "queries_skipped": known - evaluated,
            "skipped_reason": f"not judged in qrels/{plan.dataset.split}.tsv",
            "queries_without_candidates": evaluated - reranked_queries,
            "document_text": DOCUMENT_TEXT_RULE
            if plan.corpus is not None
            else f"by id from the passage store {plan.passage_store}",
        },
        "first_stage": {**plan.first_stage, "pairs": _pairs(first_stage)},
        "engine": engine,
        "chunk_size_sweep": plan.chunk_sizes,
        "rank_keywords": stats.calls,
        "fresh_state_per_query": stats.fresh_state,
        "metrics": means,
        "significance": {
            "test": f"two-sided Fisher randomization test (ranx), paired by "
            f"query, {PERMUTATIONS:,} permutations, seed {SEED}, each reranked "
            f"run against the first stage",
            "permutations": PERMUTATIONS,
            "seed": SEED,
            "p_values": p_values,
        },
        "ndcg@10_per_query": per_query,
        "notes": [
            *depth_notes(plan.depth),
            _state_note(stats.fresh_state),
            "Metrics are computed on each run in its written order (score "
            "descending, ties by document id); a document is relevant when its "
            "label is at least 1; nDCG uses linear gain (trec_eval's ndcg_cut).",
        ],
        "queries_evaluated": evaluated,
        "queries_reranked": reranked_queries,
        "queries_resumed": resumed,
        "queries_scored_this_run": stats.queries,
        "pairs_scored": sum(_pairs(run) for run in reranked.values()),
        "pairs_scored_this_run": stats.pairs,
        "engine_start_s": round(timings["engine_start"], 3),
        "rerank_time_s": round(stats.seconds, 3),
        "queries_per_s": round(stats.queries / max(stats.seconds, 1e-9), 3),
        "wall_time_s": round(time.perf_counter() - timings["started"], 3),
        "metric_names": list(METRICS),
        "files": files,
    }
    write_atomic(plan.output / "report.json", json.dumps(report, indent=2) + "\n")
    write_atomic(plan.output / "report.md", markdown_report(report))
    return report


def _state_note(fresh: bool) -> str:
    if fresh:
        return (
            "Each query was scored from a fresh engine state (passage cache off, "
            "vLLM's encoder cache emptied before each query), so its scores "
            "depend on that query alone and a resumed run writes the same bytes."
        )
    return (
        "Passage states were reused across queries (passage cache on): a score "
        "can differ in its last bits (~1e-7) with the queries scored before it, "
        "so a resumed run may differ from an uninterrupted one at that level."
    )


def _pairs(run: Run) -> int:
    return sum(len(docs) for docs in run.values())
