# SPDX-License-Identifier: Apache-2.0
"""The HTTP service beside the offline API on one workload, in one run.

    python benchmarks/http_vs_offline.py > benchmarks/results/http-vs-offline.txt

Workload: Q queries over the same D documents of L tokens (warm: the passages
are encoded by a first pass that is not timed). Offline: ``KaLMVLLMReranker``
with its engine core in its own process (as a user's script runs it), one
``margins`` call for all Q x D pairs. HTTP: ``kalm-vllm-serve`` on 127.0.0.1,
Q ``/rerank`` requests of D documents from ``--clients`` concurrent clients.
Each path runs twice: with the package's CPU setting (no core reserved for
vLLM's scheduler process) and with vLLM's own default (one reserved), which is
what made the server half as fast. Prints pairs/s per path and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cpu() -> str:
    """The CPU model and its bf16 support, from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    name = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines()
         if line.startswith("model name")),
        platform.machine(),
    )  # fmt: skip
    flags = set(info.split())
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags] or ["no native bf16"]
    return f"{name} ({', '.join(bf16)})"


def _offline(checkpoint: str, queries: list[str], docs: list[str]) -> float:
    code = f"""
import json, sys, time
from kalm_t5gemma2_vllm_plugin import KaLMVLLMReranker
queries, docs = json.loads(sys.stdin.read())
with KaLMVLLMReranker({checkpoint!r}, dtype="float32") as rr:
    rr.margins([(queries[0], d) for d in docs])  # warm: encode every passage
    start = time.perf_counter()
    rr.margins([(q, d) for q in queries for d in docs])
    print("RESULT", json.dumps(time.perf_counter() - start), flush=True)
"""
    done = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps([queries, docs]),
        capture_output=True,
        text=True,
        check=True,
    )
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    return float(line.removeprefix("RESULT "))


async def _http(url: str, queries: list[str], docs: list[str], clients: int) -> float:
    import httpx

    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=600) as http:
        await http.post("/rerank", json={"query": queries[0], "documents": docs})
        pending = list(queries)
        start = time.perf_counter()

        async def client() -> None:
            while pending:
                query = pending.pop()
                answer = await http.post(
                    "/rerank", json={"query": query, "documents": docs}
                )
                answer.raise_for_status()

        await asyncio.gather(*(client() for _ in range(clients)))
        return time.perf_counter() - start


def _serve(checkpoint: str, port: int) -> subprocess.Popen[bytes]:
    import httpx

    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kalm_t5gemma2_vllm_plugin.cli.serve",
            "--model",
            checkpoint,
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise RuntimeError("kalm-vllm-serve did not become healthy")


def main() -> None:
    from kalm_t5gemma2_vllm_plugin.bench import DEFAULT_WORKDIR
    from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import (
        make_checkpoint,
        synthetic_text,
    )

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--checkpoint", default=str(DEFAULT_WORKDIR / "kalm-nano-seed0")
    )
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--port", type=int, default=18931)
    args = parser.parse_args()
    if not (Path(args.checkpoint) / "model.safetensors").is_file():
        make_checkpoint(args.checkpoint, "nano", seed=0)
    queries = [synthetic_text(12, seed=500 + i) for i in range(args.queries)]
    docs = [synthetic_text(args.tokens, seed=600 + i) for i in range(args.documents)]
    pairs = args.queries * args.documents
    print(
        f"machine: {_cpu()}, "
        f"{os.cpu_count()} cores; checkpoint {args.checkpoint}; fp32; "
        f"{args.queries} queries x {args.documents} documents of {args.tokens} "
        f"tokens (warm), {args.clients} HTTP clients"
    )
    for label, reserved in (("package default", None), ("vLLM default", "1")):
        env = dict(os.environ)
        env.pop("VLLM_CPU_NUM_OF_RESERVED_CPU", None)
        if reserved is not None:
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = reserved
        os.environ.clear()
        os.environ.update(env)
        offline = _offline(args.checkpoint, queries, docs)
        server = _serve(args.checkpoint, args.port)
        try:
            http = asyncio.run(
                _http(f"http://127.0.0.1:{args.port}", queries, docs, args.clients)
            )
        finally:
            server.terminate()
            server.wait(timeout=120)
        print(
            f"{label:>16} (VLLM_CPU_NUM_OF_RESERVED_CPU={reserved or 'unset'}): "
            f"offline {pairs / offline:7.1f} pairs/s, HTTP {pairs / http:7.1f} "
            f"pairs/s, HTTP/offline {offline / http:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
