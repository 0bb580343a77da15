# SPDX-License-Identifier: Apache-2.0
"""Retrieval metrics and paired significance tests, computed by ranx.

Metrics: nDCG@10 (linear gain, as trec_eval's ``ndcg_cut``), MRR@10,
Recall@10, Recall@100 and MAP, each a mean over the evaluated queries; a
document counts as relevant when its label is at least 1. A query with no
candidates scores 0 on every metric. Each run is evaluated in the order it is
written (score descending, ties by document id): ranx is given rank-derived
scores, so a tie can never be ordered one way in the file and another way in
the metrics. The work runs in the helper process of ``_worker`` (ranx
imports numba, which must stay out of any process that starts an engine);
the ``*_here`` functions are what it runs.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from kalm_t5gemma2_vllm_plugin.errors import KaLMConfigError
from kalm_t5gemma2_vllm_plugin.evaluation.runs import Run

__all__ = [
    "METRICS",
    "METRIC_LABELS",
    "PERMUTATIONS",
    "SEED",
    "compare_runs",
    "compare_runs_here",
    "evaluate_run",
    "evaluate_run_here",
]

#: ranx metric names, in report order.
METRICS = ("ndcg@10", "mrr@10", "recall@10", "recall@100", "map")
METRIC_LABELS = {
    "ndcg@10": "nDCG@10",
    "mrr@10": "MRR@10",
    "recall@10": "Recall@10",
    "recall@100": "Recall@100",
    "map": "MAP",
}
#: Fisher randomization test: permutations and seed (fixed: reports reproduce).
PERMUTATIONS = 10_000
SEED = 42


def _ranx() -> Any:
    try:
        import ranx
    except ImportError as exc:
        raise KaLMConfigError(
            "kalm-vllm-eval needs ranx for its metrics: pip install "
            "'kalm-t5gemma2-vllm-plugin[eval]'"
        ) from exc
    return ranx


@contextlib.contextmanager
def _quiet_numba() -> Iterator[None]:
    """ranx's numba kernels warn about an unsigned-to-signed cast of query
    indices (harmless at any realistic size); keep it off the user's stderr."""
    from numba.core.errors import NumbaWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumbaWarning)
        yield


def _ranked(run: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Scores replaced by ``n - position`` of the written order (ties by id)."""
    out = {}
    for query_id, scores in run.items():
        order = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
        out[query_id] = {doc: float(len(order) - i) for i, (doc, _) in enumerate(order)}
    return out


#: A document id no qrels holds (ids have no whitespace): it stands in for an
#: empty run, which ranx cannot hold, and scores 0 on every metric as one would.
_NOTHING = " no candidates "


def _ranx_inputs(
    qrels: Mapping[str, Mapping[str, int]], runs: Mapping[str, Run]
) -> tuple[Any, list[Any], list[str]]:
    """ranx ``Qrels`` and one ``Run`` per name, over the queries of ``qrels``;
    a query a run lacks (or holds no document for) is empty there and scores
    0 (ranx's ``make_comparable``)."""
    ranx = _ranx()
    query_ids = sorted(qrels)
    ranx_qrels = ranx.Qrels.from_dict(
        {q: {d: int(g) for d, g in qrels[q].items()} for q in query_ids}
    )
    ranx_runs = []
    for name, run in runs.items():
        ranked = _ranked({q: run[q] for q in query_ids if run.get(q)})
        ranx_run = ranx.Run.from_dict(ranked or {query_ids[0]: {_NOTHING: 1.0}})
        ranx_run.name = name
        ranx_runs.append(ranx_run)
    return ranx_qrels, ranx_runs, query_ids


def evaluate_run(
    qrels: Mapping[str, Mapping[str, int]],
    run: Run,
    metrics: Sequence[str] = METRICS,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """``(mean per metric, {metric: {query id: value}})`` over the queries of
    ``qrels``.

    Example:
        >>> evaluate_run({"q1": {"d1": 1}}, {"q1": {"d2": 0.9, "d1": 0.5}},
        ...              ["mrr@10"])
        ({'mrr@10': 0.5}, {'mrr@10': {'q1': 0.5}})
    """
    from kalm_t5gemma2_vllm_plugin.evaluation import _worker

    means, per_query = _worker.call(
        "evaluate_run", qrels=qrels, run=run, metrics=list(metrics)
    )
    return means, per_query


def evaluate_run_here(
    qrels: Mapping[str, Mapping[str, int]], run: Run, metrics: Sequence[str]
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """``evaluate_run`` in this process (imports numba)."""
    ranx = _ranx()
    if not qrels:
        return dict.fromkeys(metrics, 0.0), {m: {} for m in metrics}
    ranx_qrels, (ranx_run,), query_ids = _ranx_inputs(qrels, {"run": run})
    with _quiet_numba():
        ranx.evaluate(ranx_qrels, ranx_run, list(metrics), make_comparable=True)
    per_query = {
        m: {q: float(ranx_run.scores[m][q]) for q in query_ids} for m in metrics
    }
    means = {m: sum(per_query[m].values()) / len(query_ids) for m in metrics}
    return means, per_query


def compare_runs(
    qrels: Mapping[str, Mapping[str, int]],
    baseline: Run,
    runs: Mapping[str, Run],
    metrics: Sequence[str] = METRICS,
) -> dict[str, dict[str, float]]:
    """Two-sided Fisher randomization p-values (ranx, ``PERMUTATIONS``
    permutations, seed ``SEED``) of each run against ``baseline``, paired by
    query: ``{run name: {metric: p}}``."""
    from kalm_t5gemma2_vllm_plugin.evaluation import _worker

    p_values: dict[str, dict[str, float]] = _worker.call(
        "compare_runs", qrels=qrels, baseline=baseline, runs=runs, metrics=list(metrics)
    )
    return p_values


def compare_runs_here(
    qrels: Mapping[str, Mapping[str, int]],
    baseline: Run,
    runs: Mapping[str, Run],
    metrics: Sequence[str],
) -> dict[str, dict[str, float]]:
    """``compare_runs`` in this process (imports numba)."""
    ranx = _ranx()
    if not qrels:
        return {name: dict.fromkeys(metrics, 1.0) for name in runs}
    ranx_qrels, ranx_runs, _ = _ranx_inputs(qrels, {"baseline": baseline, **runs})
    with _quiet_numba():
        report = ranx.compare(
            ranx_qrels,
            runs=ranx_runs,
            metrics=list(metrics),
            stat_test="fisher",
            n_permutations=PERMUTATIONS,
            random_seed=SEED,
            make_comparable=True,
        )
    comparisons = report.comparisons
    return {
        name: {
            metric: float(comparisons[("baseline", name)][metric]["p_value"])
            for metric in metrics
        }
        for name in runs
    }
