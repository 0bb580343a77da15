# SPDX-License-Identifier: Apache-2.0
"""``kalm-vllm-bench``: the plugin beside the reference and a cross-encoder peer.

In one run on one machine, each engine in its own process: scoring throughput
(pairs/s, median over repeats with min and max), latency per ``rank`` call,
peak resident memory of the process holding the model, analytic FLOPs per pair
and the achieved fraction of this machine's measured dense matmul rate.

Engines:
  reference      the Transformers reference reranker (its default batch size)
  vllm-cold      KaLMVLLMReranker, every passage new to the engine
  vllm-warm      the same passages again with new queries (already encoded)
  vllm-store     documents by id from a passage store (kalm-vllm-encode, timed
                 in its own process), on a decoder-only engine (no encoder)
  cross-encoder  a Qwen3-Reranker-0.6B-shaped checkpoint on vLLM's own
                 Qwen3ForSequenceClassification with its yes/no head
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kalm_t5gemma2_vllm_plugin.bench.flops import Dims, kalm_flops, qwen3_flops
from kalm_t5gemma2_vllm_plugin.bench.workload import Workload

__all__ = ["DEFAULT_WORKDIR", "ENGINES", "main"]

ENGINES = ("reference", "vllm-cold", "vllm-warm", "vllm-store", "cross-encoder")


#: Where generated checkpoints are kept between runs (``--workdir``); the KaLM one
#: of preset P is ``kalm-P-seed0`` inside it.
DEFAULT_WORKDIR = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    / "kalm_t5gemma2_vllm_plugin"
    / "bench"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kalm-vllm-bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--preset", default="nano", choices=["tiny", "nano", "small", "large"]
    )
    parser.add_argument(
        "--dtype",
        nargs="+",
        default=None,
        choices=["float32", "bfloat16"],
        help="default: float32, plus bfloat16 where the hardware has it (CUDA, "
        "AVX512-BF16 or AMX)",
    )
    parser.add_argument(
        "--queries",
        type=int,
        default=None,
        help="Q queries per repeat (default 4), or per pass with --sweep (default 16)",
    )
    parser.add_argument(
        "--documents", type=int, default=16, help="D documents per query"
    )
    parser.add_argument(
        "--doc-tokens",
        type=int,
        default=256,
        help="L: tokens per document (the '<Document>: ' prefix adds 3)",
    )
    parser.add_argument("--query-tokens", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch/OpenMP threads of every engine process",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help="where generated checkpoints are kept between runs",
    )
    parser.add_argument("--json", type=Path, help="write the full results here")
    sweep = parser.add_argument_group(
        "realistic sweep (--sweep): queries draw candidates from a shared pool"
    )
    sweep.add_argument(
        "--sweep",
        action="store_true",
        help="run the shared-pool sweep (see bench/sweep.py) instead of the fixed "
        "workload; --queries, --doc-tokens and --query-tokens apply",
    )
    sweep.add_argument("--pool", type=int, default=400, help="passages in the pool")
    sweep.add_argument("--zipf", type=float, default=1.0, help="popularity exponent")
    sweep.add_argument("--sweep-documents", type=int, nargs="+", default=[16, 100, 400])
    sweep.add_argument("--peer-documents", type=int, nargs="+", default=[16, 100])
    sweep.add_argument(
        "--peer-pairs",
        type=int,
        default=64,
        help="pairs the reference, cross-encoder and cold engine score per D",
    )
    sweep.add_argument(
        "--long-doc-tokens",
        type=int,
        default=1024,
        help="L of the long section (cold once, warm once); 0 skips it",
    )
    sweep.add_argument("--long-documents", type=int, default=100)
    sweep.add_argument("--long-peer-pairs", type=int, default=16)
    sweep.add_argument("--max-pass-pairs", type=int, default=1600)
    sweep.add_argument("--warm-pairs", type=int, default=400)
    sweep.add_argument(
        "--http-documents",
        type=int,
        default=100,
        help="D of the HTTP section; 0 skips it",
    )
    sweep.add_argument("--clients", type=int, default=16)
    sweep.add_argument(
        "--no-http-warm",
        action="store_true",
        help="HTTP section: the first pass only (saves a pass of Q x D pairs)",
    )
    sweep.add_argument(
        "--plot", type=Path, help="write a PNG of pairs/s against D (needs [bench])"
    )
    long = parser.add_argument_group(
        "long documents and compression (bench/long_documents.py)"
    )
    long.add_argument(
        "--long-docs",
        action="store_true",
        help="rank long documents as windows (long_document=max), cold then warm",
    )
    long.add_argument("--long-docs-documents", type=int, default=8)
    long.add_argument("--long-docs-length", type=int, default=4096)
    long.add_argument("--window-tokens", type=int, default=1024)
    long.add_argument(
        "--compression",
        action="store_true",
        help="per-request chunk sizes from one store at --chunk-size",
    )
    long.add_argument("--compression-documents", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _checkpoints(preset: str, workdir: Path, engines: Sequence[str]) -> dict[str, Path]:
    """Generate (once) the KaLM and cross-encoder checkpoints the run needs."""
    from kalm_t5gemma2_vllm_plugin.checkpoints.qwen3_peer import (
        make_cross_encoder_checkpoint,
    )
    from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import make_checkpoint

    paths = {"kalm": workdir / f"kalm-{preset}-seed0"}
    qwen_preset = "tiny" if preset == "tiny" else "qwen3-0.6b"
    paths["cross-encoder"] = workdir / f"qwen3-reranker-{qwen_preset}-seed0"
    if not (paths["kalm"] / "tokenizer.json").is_file():
        print(
            f"generating the {preset} KaLM checkpoint in {paths['kalm']}",
            file=sys.stderr,
        )
        make_checkpoint(paths["kalm"], preset, seed=0)
    if (
        "cross-encoder" in engines
        and not (paths["cross-encoder"] / "tokenizer.json").is_file()
    ):
        print(f"generating the {qwen_preset} cross-encoder checkpoint", file=sys.stderr)
        make_cross_encoder_checkpoint(paths["cross-encoder"], qwen_preset, seed=0)
    return paths


def _run_worker(config: dict[str, Any], threads: int) -> dict[str, Any]:
    from kalm_t5gemma2_vllm_plugin.bench.worker import RESULT_PREFIX

    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        "VLLM_LOGGING_STREAM": "ext://sys.stderr",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kalm_t5gemma2_vllm_plugin.bench.worker",
            json.dumps(config),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    lines = [
        line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)
    ]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"{config['engine']} failed (exit {done.returncode}):\n"
            f"{done.stderr[-4000:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_PREFIX) :])
    result["process_seconds"] = time.perf_counter() - started
    return result


def _dims(checkpoint: Path, kalm: bool) -> Dims:
    config = json.loads((checkpoint / "config.json").read_text())
    text = config["decoder"] if kalm else config
    return Dims(
        hidden=text["hidden_size"],
        intermediate=text["intermediate_size"],
        layers=text["num_hidden_layers"],
        heads=text["num_attention_heads"],
        kv_heads=text["num_key_value_heads"],
        head_dim=text["head_dim"],
        vocab=text["vocab_size"],
        sliding_window=text.get("sliding_window"),
    )


def _flops(
    engine: str, result: dict[str, Any], dims: dict[str, Dims]
) -> dict[str, int]:
    tokens = result["tokens"]
    if engine == "cross-encoder":
        return qwen3_flops(dims["cross-encoder"], tokens=tokens["prompt_tokens"])
    return kalm_flops(
        dims["kalm"],
        encoder_tokens=tokens["encoder_tokens"],
        decoder_tokens=tokens["decoder_tokens"],
        pooled=tokens["pooled"],
        full_vocab_head=engine == "reference",
        encode=engine not in ("vllm-warm", "vllm-store"),
    )


def _native_bf16() -> bool:
    import torch

    if torch.cuda.is_available():
        return True
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _machine() -> dict[str, Any]:
    import torch
    import vllm

    flags: set[str] = set()
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma")))
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "isa": isa,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": vllm.__version__,
    }


def _table(report: dict[str, Any]) -> str:
    lines = []
    for dtype, run in report["runs"].items():
        peak = run["matmul_gflops"]
        lines += [
            f"\n### {dtype} (dense matmul peak measured: {peak:.1f} GFLOP/s)\n",
            "| engine | pairs/s median (min–max) | rank latency median (s) | "
            "peak RSS (MB) | GFLOP/pair | achieved GFLOP/s | % of peak | "
            "× reference | × cross-encoder |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        engines = run["engines"]
        for name, result in engines.items():
            rate = result["pairs_per_s"]
            # "–" where the peer was not part of this run (--engines).
            rel = {
                other: f"{rate['median'] / engines[other]['pairs_per_s']['median']:.2f}"
                for other in ("reference", "cross-encoder")
                if other in engines
            }
            lines.append(
                f"| {name} | {rate['median']:.2f} ({rate['min']:.2f}–{rate['max']:.2f})"
                f" | {result['rank_latency_s']['median']:.3f}"
                f" | {result['peak_rss_mb']:.0f}"
                f" | {result['flops_per_pair']['total'] / 1e9:.2f}"
                f" | {result['achieved_gflops']:.1f}"
                f" | {100 * result['fraction_of_peak']:.0f}%"
                f" | {rel.get('reference', '–')} | {rel.get('cross-encoder', '–')} |"
            )
        if build := run.get("store_build"):
            lines.append(
                f"\nPassage store: {build['passages']} passages encoded at "
                f"{build['passages_per_s']:.2f} passages/s (kalm-vllm-encode), "
                f"{build['bytes_per_passage'] / 1024:.1f} KiB per passage on disk "
                f"({build['state_bytes_per_passage'] / 1024:.1f} KiB of states)."
            )
    return "\n".join(lines)


def _sweep(args: argparse.Namespace) -> int:
    from kalm_t5gemma2_vllm_plugin.bench import sweep

    shape = sweep.SweepShape(
        documents=tuple(args.sweep_documents),
        peer_documents=tuple(args.peer_documents),
        pool=args.pool,
        queries=args.queries,
        doc_tokens=args.doc_tokens,
        long_doc_tokens=args.long_doc_tokens or None,
        long_documents=args.long_documents,
        query_tokens=args.query_tokens,
        zipf=args.zipf,
        max_pass_pairs=args.max_pass_pairs,
        warm_pairs=args.warm_pairs,
        peer_pairs=args.peer_pairs,
        long_peer_pairs=args.long_peer_pairs,
        http_documents=args.http_documents or None,
        http_warm=not args.no_http_warm,
        clients=args.clients,
        seed=args.seed,
    )
    engines = ["cross-encoder"] if "cross-encoder" in args.engines else []
    paths = _checkpoints(args.preset, args.workdir, engines)
    machine = _machine()
    print(
        f"## kalm-vllm-bench --sweep: preset {args.preset}, pool {shape.pool} "
        f"(Zipf {shape.zipf}), Q <= {shape.queries}, chunk {args.chunk_size}\n\n"
        f"{machine['cpu']}, {machine['cores']} cores, {args.threads} threads, ISA "
        f"{' '.join(machine['isa'])}; torch {machine['torch']}, vLLM "
        f"{machine['vllm']}",
        flush=True,
    )
    for dtype in args.dtype:
        started = time.perf_counter()
        report = {
            "machine": machine,
            "preset": args.preset,
            "dtype": dtype,
            "threads": args.threads,
            "chunk_size": args.chunk_size,
            "shape": dataclasses.asdict(shape),
            "checkpoints": {k: str(v) for k, v in paths.items()},
            **sweep.run_sweep(
                shape,
                run_worker=lambda config: _run_worker(config, args.threads),
                kalm=paths["kalm"],
                cross_encoder=paths.get("cross-encoder") if engines else None,
                store_dir=args.workdir,
                dtype=dtype,
                chunk_size=args.chunk_size,
            ),
        }
        report["wall_s"]["total"] = time.perf_counter() - started
        sweep.derived(report)
        print(f"\n### {dtype}\n\n{sweep.summary_table(report)}")
        print(
            "\nwall time: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in report["wall_s"].items())
        )
        suffix = "" if len(args.dtype) == 1 else f".{dtype}"
        if args.json:
            path = args.json.with_name(args.json.stem + suffix + args.json.suffix)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2))
        if args.plot:
            sweep.plot(
                report, args.plot.with_name(args.plot.stem + suffix + args.plot.suffix)
            )
    return 0


def _long_documents(args: argparse.Namespace) -> int:
    from kalm_t5gemma2_vllm_plugin.bench import long_documents

    paths = _checkpoints(args.preset, args.workdir, [])
    machine = _machine()
    print(
        f"## kalm-vllm-bench: long documents and compression, preset "
        f"{args.preset}, chunk {args.chunk_size}\n\n{machine['cpu']}, "
        f"{machine['cores']} cores, {args.threads} threads, ISA "
        f"{' '.join(machine['isa'])}; torch {machine['torch']}, vLLM "
        f"{machine['vllm']}",
        flush=True,
    )
    shape = {
        "long": {
            "documents": args.long_docs_documents,
            "doc_tokens": args.long_docs_length,
            "window_tokens": args.window_tokens,
            "queries": args.queries,
            "query_tokens": args.query_tokens,
        },
        "compression": {
            "documents": args.compression_documents,
            "doc_tokens": args.doc_tokens,
            "queries": args.queries,
            "query_tokens": args.query_tokens,
        },
    }
    for dtype in args.dtype:
        report: dict[str, Any] = {
            "machine": machine,
            "preset": args.preset,
            "dtype": dtype,
            "threads": args.threads,
            "chunk_size": args.chunk_size,
            "shape": shape,
            "wall_s": {},
        }
        config = {
            "checkpoint": str(paths["kalm"]),
            "dtype": dtype,
            "chunk_size": args.chunk_size,
            **shape,
        }
        for section, wanted in (
            ("long", args.long_docs),
            ("compression", args.compression),
        ):
            if not wanted:
                continue
            started = time.perf_counter()
            name = "long_documents" if section == "long" else "compression"
            store = long_documents.store_path(args.workdir, dtype, args.chunk_size)
            report[section] = _run_worker(
                {**config, "section": name, "engine": name, "store": str(store)},
                args.threads,
            )
            report["wall_s"][section] = time.perf_counter() - started
            print(
                f"[bench] {section}: {report['wall_s'][section]:.0f} s", file=sys.stderr
            )
        print(f"\n### {dtype}\n\n{long_documents.summary(report)}")
        print(
            "wall time: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in report["wall_s"].items())
        )
        if args.json:
            suffix = "" if len(args.dtype) == 1 else f".{dtype}"
            path = args.json.with_name(args.json.stem + suffix + args.json.suffix)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2))
    return 0


def run(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kalm-vllm-bench``."""
    args = _parser().parse_args(argv)
    if args.queries is None:
        args.queries = 16 if args.sweep else 4
    if args.dtype is None:
        args.dtype = ["float32", "bfloat16"] if _native_bf16() else ["float32"]
        if len(args.dtype) == 1:
            print(
                "bfloat16 skipped: this CPU has no native bf16 (no AVX512-BF16 or "
                "AMX); pass --dtype bfloat16 to measure it anyway.",
                file=sys.stderr,
            )
    if args.sweep:
        return _sweep(args)
    if args.long_docs or args.compression:
        return _long_documents(args)
    workload = Workload(
        args.queries,
        args.documents,
        args.doc_tokens,
        args.query_tokens,
        args.repeats,
        args.seed,
    )
    paths = _checkpoints(args.preset, args.workdir, args.engines)
    dims = {"kalm": _dims(paths["kalm"], kalm=True)}
    if "cross-encoder" in args.engines:
        dims["cross-encoder"] = _dims(paths["cross-encoder"], kalm=False)
    report: dict[str, Any] = {
        "machine": _machine(),
        "preset": args.preset,
        "threads": args.threads,
        "chunk_size": args.chunk_size,
        "workload": workload.as_dict(),
        "checkpoints": {k: str(v) for k, v in paths.items()},
        "runs": {},
    }
    for dtype in args.dtype:
        base = {
            "workload": workload.as_dict(),
            "dtype": dtype,
            "chunk_size": args.chunk_size,
        }
        matmul = _run_worker({**base, "engine": "matmul"}, args.threads)
        peak = matmul["matmul_gflops"][dtype]
        engines: dict[str, Any] = {}
        store_build = None
        for engine in args.engines:
            checkpoint = paths["cross-encoder" if engine == "cross-encoder" else "kalm"]
            config = {
                **base,
                "engine": engine,
                "checkpoint": str(checkpoint),
                "store": str(args.workdir / f"store-{args.preset}-{dtype}"),
            }
            if engine == "vllm-store":  # encode the corpus first, in its own process
                print(f"[{dtype}] kalm-vllm-encode ...", file=sys.stderr, flush=True)
                store_build = _run_worker(
                    {**config, "engine": "store-encode"}, args.threads
                )
            print(f"[{dtype}] {engine} ...", file=sys.stderr, flush=True)
            result = _run_worker(config, args.threads)
            result["flops_per_pair"] = _flops(engine, result, dims)
            achieved = (
                result["flops_per_pair"]["total"]
                * result["pairs_per_s"]["median"]
                / 1e9
            )
            result["achieved_gflops"] = achieved
            result["fraction_of_peak"] = achieved / peak
            engines[engine] = result
        report["runs"][dtype] = {
            "store_build": store_build,
            "matmul_gflops": peak,
            "matmul_all_dtypes": matmul["matmul_gflops"],
            "engines": engines,
        }
    machine = report["machine"]
    print(
        f"## kalm-vllm-bench: preset {args.preset}, L={args.doc_tokens}, "
        f"Q={args.queries}, D={args.documents}, chunk {args.chunk_size}, "
        f"{args.repeats} repeats\n\n{machine['cpu']}, {machine['cores']} cores, "
        f"{args.threads} threads, ISA {' '.join(machine['isa'])}; torch "
        f"{machine['torch']}, vLLM {machine['vllm']}"
    )
    print(_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0
