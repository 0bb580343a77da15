# SPDX-License-Identifier: Apache-2.0
"""``kalm-vllm-bench --sweep``: the realistic workload, every engine, one run.

Queries draw their candidates from one shared pool of passages by Zipf
popularity (``workload.SharedPool``), as a first-stage retriever's top-D over a
corpus with popular passages does. Sections, each in fresh processes and each
printing its wall time:

  L = doc_tokens (256)  the pool encoded into a store (kalm-vllm-encode's code);
                        for each D: the plugin on a fresh engine (first pass over
                        all Q queries: hit rate against the workload's ceiling;
                        then a warm pass: new query texts, same candidates) and
                        the store engine (by id, decoder only); at the peers' D:
                        the reference, the cross-encoder and the plugin with
                        every passage new (cold), on the first ``peer_pairs``
                        pairs only (pairs/s is per pair); the HTTP service at
                        ``http_documents`` with ``clients`` concurrent clients
                        (its first pass, and a warm pass unless
                        ``http_warm`` is off).
  L = long_doc_tokens   the plugin cold once (one query, D fresh passages) and
                        warm once (a second query over them), and the peers on
                        ``long_peer_pairs`` pairs.

Q is ``queries`` but capped so a pass holds at most ``max_pass_pairs`` pairs; the
warm and store passes rank ``warm_pairs`` // D queries (at least one).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kalm_t5gemma2_vllm_plugin.bench.workload import SharedPool

__all__ = ["SweepShape", "break_even", "derived", "plot", "run_sweep", "summary_table"]


@dataclass(frozen=True)
class SweepShape:
    documents: tuple[int, ...] = (16, 100, 400)
    peer_documents: tuple[int, ...] = (16, 100)
    pool: int = 400
    queries: int = 16
    doc_tokens: int = 256
    long_doc_tokens: int | None = 1024
    long_documents: int = 100
    query_tokens: int = 8
    zipf: float = 1.0
    max_pass_pairs: int = 1600
    warm_pairs: int = 400
    peer_pairs: int = 64
    long_peer_pairs: int = 16
    http_documents: int | None = 100
    http_warm: bool = True
    clients: int = 16
    seed: int = 0

    def pool_for(self, documents: int, doc_tokens: int | None = None) -> SharedPool:
        queries = max(1, min(self.queries, self.max_pass_pairs // documents))
        return SharedPool(
            queries=queries,
            documents=documents,
            pool=self.pool,
            doc_tokens=doc_tokens or self.doc_tokens,
            query_tokens=self.query_tokens,
            zipf=self.zipf,
            seed=self.seed,
        )

    def warm_queries(self, documents: int) -> int:
        return max(1, self.warm_pairs // documents)


def _ceil(value: float) -> float:
    # rounded first: 9 * (0.5 - 0.1) / 0.1 is 36.000000000000004
    return float(math.ceil(round(value, 9)))


def break_even(per_pair_s: dict[str, float]) -> dict[str, float | None]:
    """How many uses of a passage it takes for encode-once to pay.

    A passage's first use costs ``cold`` (encoder + decoder), every later use
    ``warm`` (decoder only); after k uses the cost per pair is
    ``(cold + (k - 1) * warm) / k``. ``None``: never (warm is not faster).
    """
    cold, warm = per_pair_s["cold"], per_pair_s["warm"]

    def uses_to_beat(peer: float) -> float | None:
        if cold <= peer:
            return 1.0
        if warm >= peer:
            return None
        return _ceil((cold - warm) / (peer - warm))

    out: dict[str, float | None] = {
        "uses_for_90pct_of_warm": max(1.0, _ceil(9 * (cold - warm) / warm))
        if warm > 0
        else None,
    }
    for peer in ("reference", "cross-encoder"):
        if peer in per_pair_s:
            out[f"uses_to_beat_{peer}"] = uses_to_beat(per_pair_s[peer])
    if "store_build" in per_pair_s and "store" in per_pair_s:
        saved = cold - per_pair_s["store"]  # re-encoding avoided per use
        out["store_pays_after_uses"] = (
            per_pair_s["store_build"] / saved if saved > 0 else None
        )
    return out


def _section(name: str, started: float, wall: dict[str, float]) -> None:
    wall[name] = time.perf_counter() - started
    print(f"[sweep] {name}: {wall[name]:.0f} s", file=sys.stderr, flush=True)


def run_sweep(
    shape: SweepShape,
    *,
    run_worker: Callable[[dict[str, Any]], dict[str, Any]],
    kalm: Path,
    cross_encoder: Path | None,
    store_dir: Path,
    dtype: str,
    chunk_size: int,
    long_sections: bool = True,
) -> dict[str, Any]:
    """Run every section for one dtype; the report (no derived tables)."""
    base = {"dtype": dtype, "chunk_size": chunk_size, "checkpoint": str(kalm)}
    wall: dict[str, float] = {}
    sections: dict[str, Any] = {}

    def worker(engine: str, pool: SharedPool, **extra: Any) -> dict[str, Any]:
        print(
            f"[sweep] {engine} L={pool.doc_tokens} D={pool.documents} ...",
            file=sys.stderr,
            flush=True,
        )
        config = {**base, **extra, "engine": engine, "pool": pool.as_dict()}
        return run_worker(config)

    started = time.perf_counter()
    short: dict[str, Any] = {"doc_tokens": shape.doc_tokens, "by_documents": {}}
    store = str(store_dir / f"pool-{shape.doc_tokens}-{dtype}")
    # The store holds the whole pool; only `pool` and `doc_tokens` matter to it.
    short["store_build"] = worker(
        "pool-store-encode", shape.pool_for(shape.documents[0]), store=store
    )
    _section(f"L={shape.doc_tokens} store build", started, wall)
    for documents in shape.documents:
        t0 = time.perf_counter()
        pool = shape.pool_for(documents)
        warm_queries = shape.warm_queries(documents)
        row: dict[str, Any] = {
            "queries": pool.queries,
            "hit_ceiling": pool.hit_ceiling(),
        }
        row["plugin"] = worker("pool-plugin", pool, warm_queries=warm_queries)
        row["store"] = worker(
            "pool-store", pool, warm_queries=warm_queries, store=store
        )
        if documents in shape.peer_documents:
            for engine, key in (
                ("pool-cold", "cold"),
                ("pool-reference", "reference"),
                ("pool-cross-encoder", "cross-encoder"),
            ):
                if key == "cross-encoder" and cross_encoder is None:
                    continue
                extra: dict[str, Any] = {"peer_pairs": shape.peer_pairs}
                if key == "cross-encoder":
                    extra["checkpoint"] = str(cross_encoder)
                row[key] = worker(engine, pool, **extra)
        short["by_documents"][str(documents)] = row
        _section(f"L={shape.doc_tokens} D={documents}", t0, wall)
    if shape.http_documents:
        t0 = time.perf_counter()
        pool = shape.pool_for(shape.http_documents)
        short["http"] = {
            "documents": shape.http_documents,
            **worker("pool-http", pool, clients=shape.clients, warm=shape.http_warm),
        }
        _section(f"L={shape.doc_tokens} HTTP D={shape.http_documents}", t0, wall)
    sections[str(shape.doc_tokens)] = short

    if long_sections and shape.long_doc_tokens:
        t0 = time.perf_counter()
        # one query cold, a second warm: the pool is the first query's candidates
        pool = replace(
            shape.pool_for(shape.long_documents, shape.long_doc_tokens), queries=1
        )
        long: dict[str, Any] = {"doc_tokens": shape.long_doc_tokens, "by_documents": {}}
        row = {"queries": 1, "hit_ceiling": pool.hit_ceiling()}
        row["plugin"] = worker("pool-plugin", pool, warm_queries=1)
        peers = shape.long_peer_pairs
        row["reference"] = worker("pool-reference", pool, peer_pairs=peers)
        if cross_encoder is not None:
            row["cross-encoder"] = worker(
                "pool-cross-encoder",
                pool,
                peer_pairs=peers,
                checkpoint=str(cross_encoder),
            )
        long["by_documents"][str(shape.long_documents)] = row
        sections[str(shape.long_doc_tokens)] = long
        _section(f"L={shape.long_doc_tokens} D={shape.long_documents}", t0, wall)
    return {"sections": sections, "wall_s": wall}


def _rate(row: dict[str, Any], engine: str) -> float | None:
    """pairs/s of an engine's headline pass in one row."""
    result = row.get(engine)
    if result is None:
        return None
    for key in ("warm_pass", "store_pass", "subset_pass"):
        if key in result:
            return float(result[key]["pairs_per_s"])
    return None


def _cold_rate(row: dict[str, Any]) -> float | None:
    """pairs/s with every passage new: the cold engine, or a first pass that had
    nothing to reuse (the long section's single query)."""
    if (rate := _rate(row, "cold")) is not None:
        return rate
    first = row["plugin"]["first_pass"]
    return float(first["pairs_per_s"]) if first["hit_rate"] == 0 else None


def derived(report: dict[str, Any]) -> None:
    """Add per-row ratios and break-even uses to a sweep report, in place."""
    for section in report["sections"].values():
        build = section.get("store_build")
        for row in section["by_documents"].values():
            plugin = row["plugin"]
            per_pair = {"warm": 1 / plugin["warm_pass"]["pairs_per_s"]}
            if (cold := _cold_rate(row)) is not None:
                per_pair["cold"] = 1 / cold
            for peer in ("reference", "cross-encoder", "store"):
                if (rate := _rate(row, peer)) is not None:
                    per_pair[peer] = 1 / rate
            if build and "store" in per_pair:
                per_pair["store_build"] = 1 / build["passages_per_s"]
            warm = plugin["warm_pass"]["pairs_per_s"]
            row["warm_over"] = {
                peer: warm * per_pair[peer]
                for peer in ("reference", "cross-encoder")
                if peer in per_pair
            }
            row["break_even"] = break_even(per_pair) if "cold" in per_pair else None
        if "http" in section:
            http = section["http"]
            offline = section["by_documents"][str(http["documents"])]["plugin"]
            http["over_offline"] = {
                p: http[p]["pairs_per_s"] / offline[p]["pairs_per_s"]
                for p in ("first_pass", "warm_pass")
                if p in http
            }


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def summary_table(report: dict[str, Any]) -> str:
    """Markdown: one row per (L, D), every engine's pairs/s side by side."""
    lines = [
        "| L | D | Q | hit rate (ceiling) | first pass | warm | store | cold* | "
        "reference* | cross-encoder* | warm × ref | warm × cross | "
        "uses to beat cross / 90% of warm |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for section in report["sections"].values():
        for documents, row in section["by_documents"].items():
            plugin = row["plugin"]
            first = plugin["first_pass"]
            be = row.get("break_even") or {}
            cold = _cold_rate(row)
            lines.append(
                f"| {section['doc_tokens']} | {documents} | {row['queries']} "
                f"| {100 * first['hit_rate']:.1f}% ({100 * row['hit_ceiling']:.1f}%) "
                f"| {first['pairs_per_s']:.2f} | {_fmt(_rate(row, 'plugin'))} "
                f"| {_fmt(_rate(row, 'store'))} | {_fmt(cold)} "
                f"| {_fmt(_rate(row, 'reference'))} "
                f"| {_fmt(_rate(row, 'cross-encoder'))} "
                f"| {_fmt(row['warm_over'].get('reference'), 1)} "
                f"| {_fmt(row['warm_over'].get('cross-encoder'), 1)} "
                f"| {_fmt(be.get('uses_to_beat_cross-encoder'), 0)} / "
                f"{_fmt(be.get('uses_for_90pct_of_warm'), 0)} |"
            )
    lines.append(
        "\npairs/s per pair. first pass: a fresh engine over all Q queries "
        "(passages encoded on first sight, then reused); warm: new queries over "
        "the same candidates; store: by id from a passage store, decoder only. "
        "*: on the first pairs of the workload only (cold: every passage new)."
    )
    for section in report["sections"].values():
        if http := section.get("http"):
            ratio = http["over_offline"]
            lines.append(
                f"\nHTTP (`kalm-vllm-serve`, {http['clients']} concurrent clients, "
                f"L={section['doc_tokens']}, D={http['documents']}): first pass "
                f"{http['first_pass']['pairs_per_s']:.2f} pairs/s "
                f"({ratio['first_pass']:.2f}× offline)"
                + (
                    f", warm {http['warm_pass']['pairs_per_s']:.2f} pairs/s "
                    f"({ratio['warm_pass']:.2f}× offline)."
                    if "warm_pass" in http
                    else "."
                )
            )
        if build := section.get("store_build"):
            lines.append(
                f"\nStore build (L={section['doc_tokens']}): {build['passages']} "
                f"passages at {build['passages_per_s']:.2f} passages/s."
            )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """pairs/s against candidates per query, one line per engine (``[bench]``)."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(
            "--plot needs matplotlib: pip install 'kalm-t5gemma2-vllm-plugin[bench]'"
        ) from exc
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for tokens, section in report["sections"].items():
        rows = section["by_documents"]
        if len(rows) < 2:
            continue
        series: dict[str, list[tuple[int, float]]] = {}
        for documents, row in rows.items():
            d = int(documents)
            series.setdefault("plugin, first pass (shared pool)", []).append(
                (d, row["plugin"]["first_pass"]["pairs_per_s"])
            )
            for engine, label in (
                ("plugin", "plugin, warm (cache)"),
                ("store", "plugin, passage store"),
                ("cold", "plugin, cold (all new)*"),
                ("reference", "Transformers reference*"),
                ("cross-encoder", "Qwen3-0.6B-shaped cross-encoder*"),
            ):
                if (rate := _rate(row, engine)) is not None:
                    series.setdefault(label, []).append((d, rate))
        for label, points in series.items():
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", label=label)
        if http := section.get("http"):
            ax.scatter(
                [http["documents"]],
                [http["first_pass"]["pairs_per_s"]],
                marker="*",
                s=160,
                zorder=5,
                color="black",
                label=f"HTTP first pass, {http['clients']} clients",
            )
        ax.set_title(f"KaLM-Reranker Nano dims, L = {tokens} tokens")
    machine = report["machine"]
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(
        sorted({int(d) for s in report["sections"].values() for d in s["by_documents"]})
    )
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("candidates per query (D)")
    ax.set_ylabel("pairs/s (log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.text(
        0.01,
        0.01,
        f"{machine['cpu']}, {machine['cores']} cores, {report['dtype']}; "
        "*: first pairs of the workload only",
        fontsize=6,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
