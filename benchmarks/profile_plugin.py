# SPDX-License-Identifier: Apache-2.0
"""Where the plugin's time goes: torch profiler over warm or cold rank calls.

    OMP_NUM_THREADS=2 VLLM_ENABLE_V1_MULTIPROCESSING=0 \\
      python benchmarks/profile_plugin.py --mode warm > profiles/warm-fp32.txt

Uses the checkpoint kalm-vllm-bench generated (nano preset by default) and the
same workload shape (L=256 documents, 16 per query). Prints wall time per rank
call, the share spent inside torch operators, and the top operators.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from kalm_t5gemma2_vllm_plugin.bench import DEFAULT_WORKDIR

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--checkpoint", default=str(DEFAULT_WORKDIR / "kalm-nano-seed0")
    )
    parser.add_argument("--mode", choices=["warm", "cold", "store"], default="warm")
    parser.add_argument(
        "--store",
        default="/tmp/kalm-profile-store",
        help="passage store for --mode store",
    )
    parser.add_argument(
        "--reuse-store",
        action="store_true",
        help="use --store as it is (built by an earlier run) so "
        "this process never loads the encoder",
    )
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from kalm_t5gemma2_vllm_plugin import KaLMVLLMReranker
    from kalm_t5gemma2_vllm_plugin.bench.workload import Workload

    workload = Workload(
        queries=args.calls, documents=16, doc_tokens=256, query_tokens=8, repeats=1
    )
    options = {}
    if args.mode == "store":
        store = args.store if args.reuse_store else _build_store(args, workload)
        options = {"passage_store": store, "decoder_only": True}
    with KaLMVLLMReranker(args.checkpoint, dtype=args.dtype, **options) as reranker:
        ids = [f"doc-{i}" for i in range(workload.documents)]

        def rank(i: int) -> None:
            if args.mode == "store":
                reranker.rank(workload.query(0, i), document_ids=ids)
            else:
                docs = (
                    workload.document_set(0)
                    if args.mode == "warm"
                    else workload.cold_set(0, i)
                )
                reranker.rank(workload.query(0, i), docs)

        if args.mode == "store":  # prime
            reranker.rank(workload.query(-1, 0), document_ids=ids)
        else:
            reranker.rank(workload.query(-1, 0), workload.document_set(0))
        started = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(args.calls):
                rank(i)
        wall = time.perf_counter() - started
    events = prof.key_averages()
    # Time inside the top-level torch ops (children excluded to avoid double counting).
    op_seconds = sum(e.self_cpu_time_total for e in events) / 1e6
    print(
        f"mode={args.mode} dtype={args.dtype} threads={torch.get_num_threads()} "
        f"calls={args.calls} x 16 pairs"
    )
    print(
        f"wall {wall:.2f}s ({wall / args.calls:.3f}s per rank call); "
        f"self time in torch ops {op_seconds:.2f}s ({100 * op_seconds / wall:.0f}% "
        f"of wall); the rest is Python, vLLM scheduling and input processing"
    )
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))


def _build_store(args: argparse.Namespace, workload: object) -> str:
    import json
    import shutil

    from kalm_t5gemma2_vllm_plugin.store.encoder import PassageEncoder, encode_corpus
    from kalm_t5gemma2_vllm_plugin.store.format import StoreIdentity

    shutil.rmtree(args.store, ignore_errors=True)
    corpus = Path(args.store + ".jsonl")
    corpus.write_text(
        "".join(
            json.dumps({"id": f"doc-{i}", "text": t}) + "\n"
            for i, t in enumerate(workload.document_set(0))
        )
    )  # type: ignore[attr-defined]
    encoder = PassageEncoder(
        args.checkpoint, chunk_size=4, document_max_length=1024, dtype=args.dtype
    )
    identity = StoreIdentity.for_engine(args.checkpoint, 4, 1024, args.dtype)
    encode_corpus(encoder, corpus, Path(args.store), batch_size=16, identity=identity)
    return args.store


if __name__ == "__main__":
    main()
