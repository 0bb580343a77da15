# SPDX-License-Identifier: Apache-2.0
"""Reranking quality on a BEIR-layout dataset: ``evaluate`` and ``kalm-vllm-eval``.

Modules: ``beir`` (the dataset), ``runs`` (run files), ``first_stage`` (BM25),
``rerank`` (the resumable loop), ``journal`` (what it resumes from),
``metrics`` (ranx), ``report``/``output``/``plot`` (what is written), ``api``
(``evaluate``). ranx, bm25s and matplotlib (the ``[eval]`` extra) load only
when used.
"""

from __future__ import annotations

from kalm_t5gemma2_vllm_plugin.evaluation.api import (
    EvalPlan,
    engine_identity,
    evaluate,
    prepare,
    rerank_and_report,
)
from kalm_t5gemma2_vllm_plugin.evaluation.beir import (
    document_text,
    read_corpus,
    read_qrels,
    read_queries,
)
from kalm_t5gemma2_vllm_plugin.evaluation.first_stage import bm25_run
from kalm_t5gemma2_vllm_plugin.evaluation.metrics import (
    METRICS,
    compare_runs,
    evaluate_run,
)
from kalm_t5gemma2_vllm_plugin.evaluation.runs import (
    format_trec,
    read_run,
    top_candidates,
    write_trec,
)

__all__ = [
    "METRICS",
    "EvalPlan",
    "bm25_run",
    "compare_runs",
    "document_text",
    "engine_identity",
    "evaluate",
    "evaluate_run",
    "format_trec",
    "prepare",
    "read_corpus",
    "read_qrels",
    "read_queries",
    "read_run",
    "rerank_and_report",
    "top_candidates",
    "write_trec",
]
