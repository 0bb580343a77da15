# SPDX-License-Identifier: Apache-2.0
"""The evaluation report as Markdown (``report.md``), from ``report.json``'s dict."""

from __future__ import annotations

from typing import Any

from kalm_t5gemma2_vllm_plugin.evaluation.metrics import METRIC_LABELS, METRICS

__all__ = ["depth_notes", "markdown_report"]


def depth_notes(depth: int) -> list[str]:
    """What a reranked run shares with its first stage by construction."""
    equal = [METRIC_LABELS[m] for m in METRICS if m.startswith("recall@")]
    equal = [label for label in equal if int(label.split("@")[1]) >= depth]
    if not equal:
        return []
    return [
        f"At --depth {depth} a reranked run holds exactly the first stage's top "
        f"{depth} documents per query, so {' and '.join(equal)} of the reranked "
        f"run equal{'s' if len(equal) == 1 else ''} the first stage's by "
        f"construction; reranking moves the other metrics only."
    ]


def _value(x: float) -> str:
    return f"{x:.4f}"


def _p(x: float) -> str:
    return "<0.0001" if x < 1e-4 else f"{x:.4f}"


def _metric_table(report: dict[str, Any]) -> list[str]:
    metrics = report["metrics"]
    p_values = report["significance"]["p_values"]
    names = [n for n in metrics if n != "first_stage"]
    if names == ["reranked"]:
        lines = [
            "| metric | first stage | reranked | change | p (Fisher) |",
            "|---|---:|---:|---:|---:|",
        ]
        for m in METRICS:
            first, rerank = metrics["first_stage"][m], metrics["reranked"][m]
            lines.append(
                f"| {METRIC_LABELS[m]} | {_value(first)} | {_value(rerank)} | "
                f"{rerank - first:+.4f} | {_p(p_values['reranked'][m])} |"
            )
        return lines
    # A chunk-size sweep: one row per run, p against the first stage in brackets.
    header = " | ".join(METRIC_LABELS[m] for m in METRICS)
    lines = [f"| run | {header} |", "|---|" + "---:|" * len(METRICS)]
    row = " | ".join(_value(metrics["first_stage"][m]) for m in METRICS)
    lines.append(f"| first stage | {row} |")
    for name in names:
        cells = " | ".join(
            f"{_value(metrics[name][m])} (p {_p(p_values[name][m])})" for m in METRICS
        )
        lines.append(f"| {name.replace('chunk_size=', 'chunk size ')} | {cells} |")
    return lines


def markdown_report(report: dict[str, Any]) -> str:
    """``report.md``: settings, the metric table, counts, timings and notes."""
    data, first, engine = report["dataset"], report["first_stage"], report["engine"]
    sig = report["significance"]
    source = (
        f"BM25 (bm25s, {first['settings']['method']}, k1 {first['settings']['k1']}, "
        f"b {first['settings']['b']}, English stop words)"
        if first["source"] == "bm25"
        else f"run file `{first['run_file']}`"
    )
    sweep = report.get("chunk_size_sweep")
    chunk = (
        f"chunk sizes {', '.join(map(str, sweep))} (one engine at "
        f"{engine['encoder_chunk_size']}, coarser sizes by per-request compression)"
        if sweep
        else f"encoder chunk size {engine['encoder_chunk_size']}"
    )
    lines = [
        f"# kalm-vllm-eval: {data['name']} ({data['split']})",
        "",
        f"Model `{engine['model']}`: dtype {engine['dtype']}, {chunk}, "
        f"document_max_length {engine['document_max_length']}, long documents: "
        f"{engine['long_document']}.",
        f"First stage: {source}; its top {first['depth']} per query reranked.",
        "",
        *_metric_table(report),
        "",
        f"p: {sig['test']}.",
        "",
        f"- Queries: {data['queries_evaluated']} evaluated "
        f"(judged in `qrels/{data['split']}.tsv`); {data['queries_skipped']} of "
        f"queries.jsonl skipped: {data['skipped_reason']}.",
    ]
    if count := data["queries_without_candidates"]:
        lines.append(
            f"- {count} evaluated "
            + ("query has" if count == 1 else "queries have")
            + " no first-stage candidates and "
            + ("scores" if count == 1 else "score")
            + " 0 on every metric."
        )
    lines += [
        f"- Pairs scored: {report['pairs_scored']:,} for "
        f"{report['queries_reranked']} queries; this run: "
        f"{report['queries_scored_this_run']} queries, "
        f"{report['pairs_scored_this_run']:,} pairs "
        f"({report['queries_resumed']} resumed from the journal).",
        f"- Wall time {report['wall_time_s']:.1f} s (reranking "
        f"{report['rerank_time_s']:.1f} s, {report['queries_per_s']:.2f} queries/s).",
        f"- Document text: {data['document_text']}; query text: `text` of "
        "queries.jsonl.",
    ]
    lines += [f"- {note}" for note in report["notes"]]
    files = ", ".join(f"`{name}`" for name in report["files"].values())
    lines += ["", f"Files: {files}.", ""]
    return "\n".join(lines)
