# SPDX-License-Identifier: Apache-2.0
"""``kalm-vllm-bench --long-docs`` and ``--compression``: long documents as
windows, and per-request compression from one store.

``--long-docs``: D documents of ``--long-doc-tokens`` tokens (default 4,096)
ranked with ``long_document="max"`` at windows of ``--window-tokens`` (default
1,024), by Q queries: the first query encodes every window (cold), the others
find them cached (warm). Reported: documents/s and windows/s per pass, windows
encoded per query (the engine's counters), and the peak RSS while ranking
one long document against one document of a single window.

``--compression``: one store at chunk N (``--chunk-size``, default 4), an
engine reading it; per-request ``encoder_chunk_size`` N..32 re-pools the
stored states: pairs/s and the margin difference against N, and against an
engine started at each coarser size (the first query's pairs as text, encoded
there), which is the rounding of re-pooling (~1e-6 in fp32, larger in bf16).

Each runs in a worker process (``worker.py``), as every benchmark engine does.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import synthetic_text

__all__ = ["run_compression", "run_long_documents", "summary"]


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # VmHWM back to the current RSS


def run_long_documents(config: dict[str, Any]) -> dict[str, Any]:
    from kalm_t5gemma2_vllm_plugin.bench.worker import _peak_rss_mb
    from kalm_t5gemma2_vllm_plugin.rerankers.vllm import KaLMVLLMReranker

    shape = config["long"]
    window = shape["window_tokens"]
    docs = [
        synthetic_text(shape["doc_tokens"], seed=50_000 + i)
        for i in range(shape["documents"])
    ]
    queries = [
        synthetic_text(shape["query_tokens"], seed=60_000 + q)
        for q in range(shape["queries"])
    ]
    with KaLMVLLMReranker(
        config["checkpoint"],
        dtype=config["dtype"],
        encoder_chunk_size=config["chunk_size"],
        document_max_length=window,
    ) as reranker:
        # warm-up, and the peak of one single-window document
        reranker.rank("warm up", [synthetic_text(window - 16, seed=1)])
        _reset_peak()
        reranker.rank(queries[0], [synthetic_text(window - 16, seed=2)])
        peak_one = _peak_rss_mb()
        _reset_peak()
        reranker.rank(
            queries[0],
            [synthetic_text(shape["doc_tokens"], seed=3)],
            long_document="max",
        )
        peak_long = _peak_rss_mb()
        passes = []
        for q, query in enumerate(queries):
            before = reranker.stats()
            started = time.perf_counter()
            results = reranker.rank(query, docs, long_document="max")
            seconds = time.perf_counter() - started
            after = reranker.stats()
            windows = sum(r["windows"] for r in results)
            passes.append(
                {
                    "query": q,
                    "seconds": seconds,
                    "documents_per_s": len(docs) / seconds,
                    "windows_per_s": windows / seconds,
                    "windows": windows,
                    "windows_encoded": after["passages_encoded"]
                    - before["passages_encoded"],
                }
            )
        truncate_started = time.perf_counter()
        reranker.rank(queries[-1], docs)
        truncate_seconds = time.perf_counter() - truncate_started
    return {
        "cold": passes[0],
        "warm": passes[1:],
        "truncate_documents_per_s": len(docs) / truncate_seconds,
        "peak_rss_one_window_mb": peak_one,
        "peak_rss_long_document_mb": peak_long,
    }


def run_compression(config: dict[str, Any]) -> dict[str, Any]:
    from kalm_t5gemma2_vllm_plugin import DocumentId, KaLMVLLMReranker
    from kalm_t5gemma2_vllm_plugin.bench.worker import _build_store

    shape = config["compression"]
    base = config["chunk_size"]
    texts = [
        synthetic_text(shape["doc_tokens"], seed=70_000 + i)
        for i in range(shape["documents"])
    ]
    ids = [f"c{i}" for i in range(len(texts))]
    built = _build_store(config, list(zip(ids, texts, strict=True)))
    queries = [
        synthetic_text(shape["query_tokens"], seed=80_000 + q)
        for q in range(shape["queries"])
    ]
    sizes = [n for n in (1, 2, 4, 8, 16, 32) if n >= base and n % base == 0]
    rows: dict[int, dict[str, Any]] = {}
    by_size: dict[int, list[float]] = {}
    with KaLMVLLMReranker(
        config["checkpoint"],
        dtype=config["dtype"],
        encoder_chunk_size=base,
        passage_store=config["store"],
        document_max_length=1024,
    ) as reranker:
        pairs = [(q, DocumentId(i)) for q in queries for i in ids]
        reranker.margins(pairs[: len(ids)])  # warm-up
        for n in sizes:
            started = time.perf_counter()
            by_size[n] = reranker.margins(pairs, encoder_chunk_size=n)
            seconds = time.perf_counter() - started
            rows[n] = {"pairs_per_s": len(pairs) / seconds, "seconds": seconds}
    # The engines started at each size encode text: one query's pairs.
    text_pairs = [(queries[0], t) for t in texts]
    for n in sizes:
        rows[n]["max_abs_margin_diff_vs_base"] = max(
            abs(a - b) for a, b in zip(by_size[n], by_size[base], strict=True)
        )
        with KaLMVLLMReranker(
            config["checkpoint"],
            dtype=config["dtype"],
            encoder_chunk_size=n,
            document_max_length=1024,
        ) as direct:
            started = time.perf_counter()
            want = direct.margins(text_pairs)
            rows[n]["engine_at_size_pairs_per_s"] = len(text_pairs) / (
                time.perf_counter() - started
            )
        rows[n]["max_abs_margin_diff_vs_engine_at_size"] = max(
            abs(a - b) for a, b in zip(by_size[n][: len(want)], want, strict=True)
        )
    return {"store": built, "sizes": {str(n): rows[n] for n in sizes}}


def summary(report: dict[str, Any]) -> str:
    """Markdown of whichever sections ran."""
    out = []
    if "long" in report:
        r, shape = report["long"], report["shape"]["long"]
        warm = r["warm"]
        warm_docs = sum(p["documents_per_s"] for p in warm) / max(1, len(warm))
        warm_windows = sum(p["windows_per_s"] for p in warm) / max(1, len(warm))
        growth = r["peak_rss_long_document_mb"] / r["peak_rss_one_window_mb"] - 1
        out += [
            f"### Long documents: {shape['documents']} documents of "
            f"{shape['doc_tokens']} tokens, windows of {shape['window_tokens']} "
            f"(long_document=max), {shape['queries']} queries",
            "",
            "| pass | documents/s | windows/s | windows scored | windows encoded |",
            "|---|---|---|---|---|",
            f"| cold (query 1) | {r['cold']['documents_per_s']:.3f} | "
            f"{r['cold']['windows_per_s']:.2f} | {r['cold']['windows']} | "
            f"{r['cold']['windows_encoded']} |",
        ]
        out += [
            f"| warm (query {p['query'] + 1}) | {p['documents_per_s']:.3f} | "
            f"{p['windows_per_s']:.2f} | {p['windows']} | {p['windows_encoded']} |"
            for p in warm
        ]
        out += [
            "",
            f"warm mean: {warm_docs:.3f} documents/s ({warm_windows:.2f} windows/s); "
            f"truncate (the head only: a passage of its own, not the first "
            f"window, so encoded in this pass): {r['truncate_documents_per_s']:.3f} "
            f"documents/s. Peak RSS ranking one {shape['doc_tokens']}-token document "
            f"{r['peak_rss_long_document_mb']:.0f} MB vs one single-window document "
            f"{r['peak_rss_one_window_mb']:.0f} MB "
            f"({100 * growth:+.1f}%).",
            "",
        ]
    if "compression" in report:
        r, shape = report["compression"], report["shape"]["compression"]
        out += [
            f"### Compression from one store at chunk {report['chunk_size']}: "
            f"{shape['documents']} passages of {shape['doc_tokens']} tokens by id, "
            f"{shape['queries']} queries",
            "",
            "| chunk | pairs/s (store, re-pooled) | max abs margin diff vs chunk "
            f"{report['chunk_size']} | max abs diff vs an engine started at that "
            "chunk | pairs/s of that engine (text, cold) |",
            "|---|---|---|---|---|",
        ]
        for n, row in r["sizes"].items():
            out.append(
                f"| {n} | {row['pairs_per_s']:.2f} | "
                f"{row['max_abs_margin_diff_vs_base']:.3g} | "
                f"{row['max_abs_margin_diff_vs_engine_at_size']:.2g} | "
                f"{row['engine_at_size_pairs_per_s']:.2f} |"
            )
        out.append("")
    return "\n".join(out)


def store_path(workdir: Path, dtype: str, chunk_size: int) -> Path:
    return workdir / f"compression-store-{dtype}-{chunk_size}"
