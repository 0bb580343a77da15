# SPDX-License-Identifier: Apache-2.0
"""The report's picture (matplotlib, ``[eval]``): nDCG@10 per query, first
stage against reranked, or every metric against the chunk size of a sweep."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kalm_t5gemma2_vllm_plugin.errors import KaLMConfigError
from kalm_t5gemma2_vllm_plugin.evaluation.metrics import METRIC_LABELS, METRICS

__all__ = ["plot_chunk_size_sweep", "plot_per_query"]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise KaLMConfigError(
            "The plot needs matplotlib: pip install "
            "'kalm-t5gemma2-vllm-plugin[eval]' (or pass --no-plot)."
        ) from exc
    return plt


def plot_per_query(
    first_stage: Mapping[str, float],
    reranked: Mapping[str, float],
    path: Path,
    title: str,
) -> Path:
    """One point per query: first-stage nDCG@10 (x) against reranked (y);
    points above the diagonal are queries the reranker improved."""
    plt = _pyplot()
    queries = sorted(first_stage)
    xs = [first_stage[q] for q in queries]
    ys = [reranked[q] for q in queries]
    better = sum(y > x for x, y in zip(xs, ys, strict=True))
    worse = sum(y < x for x, y in zip(xs, ys, strict=True))
    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=120)
    ax.plot([0, 1], [0, 1], color="grey", linewidth=1, linestyle="--")
    ax.scatter(xs, ys, s=18, alpha=0.6, edgecolors="none")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_aspect("equal")
    ax.set_xlabel("nDCG@10, first stage")
    ax.set_ylabel("nDCG@10, reranked")
    ax.set_title(title, fontsize=10)
    ax.text(
        0.02,
        0.97,
        f"{len(queries)} queries: {better} better, {worse} worse, "
        f"{len(queries) - better - worse} unchanged",
        transform=ax.transAxes,
        fontsize=8,
        va="top",
    )
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_chunk_size_sweep(
    metrics: Mapping[str, Mapping[str, float]],
    chunk_sizes: list[int],
    path: Path,
    title: str,
) -> Path:
    """Each metric against the chunk size (``metrics["chunk_size=N"]``), with
    the first stage's value as a dashed line of the same colour."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for metric in METRICS:
        ys = [metrics[f"chunk_size={n}"][metric] for n in chunk_sizes]
        (line,) = ax.plot(chunk_sizes, ys, marker="o", label=METRIC_LABELS[metric])
        ax.axhline(
            metrics["first_stage"][metric],
            color=line.get_color(),
            linestyle="--",
            linewidth=0.8,
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(chunk_sizes)
    ax.set_xticklabels([str(n) for n in chunk_sizes])
    ax.set_xlabel("encoder chunk size (compression)")
    ax.set_ylabel("metric (dashed: first stage)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
