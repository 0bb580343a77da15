# SPDX-License-Identifier: Apache-2.0
"""When does the plugin's engine process reach its peak resident memory?

    python benchmarks/memory_timeline.py --dtype bfloat16 2> timeline.txt

Samples VmRSS every 20 ms (printing each change of more than 60 MB) while
``KaLMVLLMReranker`` starts and ranks 16 documents once, with vLLM's INFO log
interleaved, so the peak can be placed in a phase (imports, weight loading,
first batch). Uses the checkpoint kalm-vllm-bench generated (nano by default).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

STARTED = time.monotonic()


def _status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in MB."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith("Vm"))
    return {k: int(fields[k].split()[0]) // 1024 for k in ("VmRSS", "VmHWM")}


def _say(message: str) -> None:
    elapsed = time.monotonic() - STARTED
    print(f"[{elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)


def _sample(step_mb: int = 60) -> None:
    last = 0
    while True:
        rss = _status()["VmRSS"]
        if abs(rss - last) > step_mb:
            _say(f"rss {rss} MB")
            last = rss
        time.sleep(0.02)


def main() -> None:
    from kalm_t5gemma2_vllm_plugin.bench import DEFAULT_WORKDIR

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--checkpoint", default=str(DEFAULT_WORKDIR / "kalm-nano-seed0")
    )
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    threading.Thread(target=_sample, daemon=True).start()
    from kalm_t5gemma2_vllm_plugin import KaLMVLLMReranker
    from kalm_t5gemma2_vllm_plugin.bench.workload import Workload

    workload = Workload(
        queries=1, documents=16, doc_tokens=256, query_tokens=8, repeats=1
    )
    _say(f"imports done: {_status()}")
    with KaLMVLLMReranker(args.checkpoint, dtype=args.dtype) as reranker:
        _say(f"engine ready: {_status()}")
        reranker.rank(workload.query(0, 0), workload.document_set(0))
        _say(f"after one rank call: {_status()}")


if __name__ == "__main__":
    main()
