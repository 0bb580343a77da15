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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default=str(
        Path.home() / ".cache/kalm_t5gemma2_vllm_plugin/bench/kalm-nano-seed0"))
    parser.add_argument("--mode", choices=["warm", "cold"], default="warm")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from kalm_t5gemma2_vllm_plugin import KaLMVLLMReranker
    from kalm_t5gemma2_vllm_plugin.bench.workload import Workload

    workload = Workload(queries=args.calls, documents=16, doc_tokens=256,
                        query_tokens=8, repeats=1)
    with KaLMVLLMReranker(args.checkpoint, dtype=args.dtype) as reranker:
        reranker.rank(workload.query(-1, 0), workload.document_set(0))  # prime
        documents = (lambda i: workload.document_set(0)) if args.mode == "warm" \
            else (lambda i: workload.cold_set(0, i))
        started = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(args.calls):
                reranker.rank(workload.query(0, i), documents(i))
        wall = time.perf_counter() - started
    events = prof.key_averages()
    # Time inside the top-level torch ops (children excluded to avoid double counting).
    op_seconds = sum(e.self_cpu_time_total for e in events) / 1e6
    print(f"mode={args.mode} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"calls={args.calls} x 16 pairs")
    print(f"wall {wall:.2f}s ({wall / args.calls:.3f}s per rank call); "
          f"self time in torch ops {op_seconds:.2f}s ({100 * op_seconds / wall:.0f}% "
          f"of wall); the rest is Python, vLLM scheduling and input processing")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
