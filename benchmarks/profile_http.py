# SPDX-License-Identifier: Apache-2.0
"""Where the HTTP path's time goes: py-spy over ``kalm-vllm-serve`` and its engine.

    python benchmarks/profile_http.py --py-spy /path/to/py-spy \\
      > benchmarks/profiles/http-warm-fp32.txt

Starts ``kalm-vllm-serve`` on the benchmark's Nano checkpoint, sends the shared
pool's first pass (16 queries x 100 candidates of 256 tokens, 16 concurrent
clients) so every passage is cached, then records the warm pass with
``py-spy record --subprocesses --format raw`` (sampling every process of the
server: the API server, the engine core and its worker; py-spy reports them
under the server's pid, so the shares are of all of them together) and prints
the share of samples by phase and the top frames by own time. py-spy
is not a dependency: pass its path (``pip install py-spy`` anywhere).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# A frame's phase: the first pattern found in its stack, outermost first wins
# over nothing; checked from the innermost frame outwards.
PHASES = (
    ("torch operators", ("torch/nn/", "torch/_ops", "aten", "F.linear")),
    (
        "model forward (plugin)",
        ("kalm_t5gemma2_vllm_plugin/t5gemma2", "kalm_t5gemma2_vllm_plugin/vllm_model"),
    ),
    ("request building (tokenize)", ("engine/requests.py", "tokenizers")),
    (
        "HTTP + JSON (uvicorn, FastAPI, pydantic)",
        ("uvicorn", "fastapi", "starlette", "pydantic", "json"),
    ),
    ("vLLM scheduling + IPC", ("vllm/v1/core", "vllm/v1/engine", "zmq", "msgspec")),
    ("vLLM model runner", ("vllm/v1/worker", "vllm/worker", "model_runner")),
    # sched_yield: vLLM's shared-memory queue spinning (py-spy drops truly idle
    # threads, so what is left here burns CPU)
    (
        "waiting (spin or poll)",
        ("select", "epoll", "poll", "wait", "sleep", "recv", "sched_yield"),
    ),
)


def _phase(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for name, patterns in PHASES:
            if any(p in frame for p in patterns):
                return name
    return "other Python"


def _summary(raw: Path) -> str:
    by_process: dict[str, collections.Counter[str]] = collections.defaultdict(
        collections.Counter
    )
    own: dict[str, collections.Counter[str]] = collections.defaultdict(
        collections.Counter
    )
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        # --subprocesses: the first frame is 'process PID:"command line"'
        process, _, rest = stack.partition(";")
        process = process[:90]
        by_process[process][_phase(rest)] += int(count)
        own[process][rest.split(";")[-1]] += int(count)
    out = []
    for process, phases in sorted(by_process.items(), key=lambda kv: -kv[1].total()):
        total = phases.total()
        out.append(f"\n## {process}: {total} samples")
        for name, count in phases.most_common():
            out.append(f"  {100 * count / total:5.1f}%  {name}")
        out.append("  top frames by own samples:")
        for frame, count in own[process].most_common(8):
            out.append(f"  {100 * count / total:5.1f}%  {frame[:110]}")
    return "\n".join(out)


async def _pass(url: str, queries: list[str], docs: list[list[str]], clients: int):
    import httpx

    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=3600) as http:
        pending = list(range(len(queries)))

        async def client() -> None:
            while pending:
                q = pending.pop(0)
                answer = await http.post(
                    "/rerank", json={"query": queries[q], "documents": docs[q]}
                )
                answer.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return time.perf_counter() - started


def main() -> None:
    from kalm_t5gemma2_vllm_plugin.bench import DEFAULT_WORKDIR
    from kalm_t5gemma2_vllm_plugin.bench.worker import _serve
    from kalm_t5gemma2_vllm_plugin.bench.workload import SharedPool

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--checkpoint", default=str(DEFAULT_WORKDIR / "kalm-nano-seed0")
    )
    parser.add_argument("--py-spy", required=True, help="path of the py-spy binary")
    parser.add_argument("--documents", type=int, default=100)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rate", type=int, default=50, help="py-spy samples/s")
    args = parser.parse_args()

    pool = SharedPool(args.queries, args.documents, 400, 256)
    texts = [pool.passage(i) for i in range(pool.pool)]
    docs = [[texts[i] for i in pool.candidates(q)] for q in range(pool.queries)]
    process, url = _serve(
        {"checkpoint": args.checkpoint, "dtype": "float32", "chunk_size": 4}
    )
    try:
        first = [pool.query(0, q) for q in range(pool.queries)]
        cold = asyncio.run(_pass(url, first, docs, args.clients))
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "http.raw"
            spy = subprocess.Popen(
                [
                    args.py_spy,
                    "record",
                    "--pid",
                    str(process.pid),
                    "--subprocesses",
                    "--format",
                    "raw",
                    "--rate",
                    str(args.rate),
                    "--output",
                    str(raw),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(2)  # py-spy attaches
            warm = asyncio.run(
                _pass(
                    url,
                    [pool.query(1, q) for q in range(pool.queries)],
                    docs,
                    args.clients,
                )
            )
            spy.send_signal(2)
            spy.wait(timeout=60)
            pairs = pool.queries * pool.documents
            print(
                f"# kalm-vllm-serve, warm pass: {pool.queries} queries x "
                f"{pool.documents} cached passages of 256 tokens, {args.clients} "
                f"concurrent clients, fp32, {os.cpu_count()} cores\n"
                f"first pass {pairs / cold:.2f} pairs/s, warm pass "
                f"{pairs / warm:.2f} pairs/s ({warm:.1f} s), py-spy at "
                f"{args.rate} Hz over every process of the server"
            )
            print(_summary(raw))
    finally:
        process.terminate()
        process.wait(timeout=120)


if __name__ == "__main__":
    sys.exit(main())
