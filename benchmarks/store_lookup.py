# SPDX-License-Identifier: Apache-2.0
"""By-id lookup of 100 random passages: the Lance store against the directory
store, side by side (issue 14's benchmark).

Stores are written by the store writers directly (synthetic states, not
encoded), then read with ``load(ids)`` as an engine does (every row's CRC-32
checked): p50 and p99 over ``--trials`` lookups, and the bytes the process
read per lookup (``/proc/self/io`` rchar: syscalls only, so the directory
store's memory-mapped shard reads are not in it; states returned per lookup
are the same for both). Shapes: 100,000 passages of 64 x 64 fp32 (16 KiB) on
local disk; 10,000 at Nano dims in bf16 (64 x 640, 80 KiB) on local disk; the
same 10,000 on S3 served by moto on 127.0.0.1 (Lance only: moto keeps objects
in memory and is itself slow, ~46 ms a GET on 2 cores).

    .venv/bin/python benchmarks/store_lookup.py [--small 100000 --nano 10000 --s3 10000]
"""

from __future__ import annotations

import argparse
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from kalm_t5gemma2_vllm_plugin.store.format import (
    PassageRecord,
    StoreIdentity,
    text_sha256,
)
from kalm_t5gemma2_vllm_plugin.store.uri import open_store, open_writer

BATCH = 1000


def _rchar() -> int:
    for line in open("/proc/self/io", encoding="ascii"):
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def _write(uri: str, count: int, hidden: int, dtype: torch.dtype, options) -> float:
    identity = StoreIdentity(
        "bench", 4, 256, "kalm-v1", str(dtype).removeprefix("torch.")
    )
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    with open_writer(uri, identity, storage_options=options) as writer:
        for start in range(0, count, BATCH):
            items = []
            for i in range(start, min(count, start + BATCH)):
                states = torch.randn(64, hidden, generator=generator).to(dtype)
                pid = f"p{i:07d}"
                record = PassageRecord(pid, text_sha256(pid), 64, 256, False, "0" * 40)
                items.append((record, states))
            writer.write(items)
    if uri.endswith(".lance"):
        from kalm_t5gemma2_vllm_plugin.store.maintenance import compact_store

        compact_store(uri, storage_options=options)  # builds the id index
    return time.perf_counter() - started


def _lookups(uri: str, count: int, trials: int, options) -> dict[str, float]:
    store = open_store(uri, storage_options=options)
    rng = random.Random(1)
    store.load([f"p{rng.randrange(count):07d}" for _ in range(100)])  # warm-up
    times, read = [], []
    for _ in range(trials):
        ids = [f"p{i:07d}" for i in rng.sample(range(count), 100)]
        before, t0 = _rchar(), time.perf_counter()
        loaded = store.load(ids)
        times.append(1000 * (time.perf_counter() - t0))
        read.append(_rchar() - before)
        assert len(loaded) == 100
    store.close()
    times.sort()
    return {
        "p50_ms": statistics.median(times),
        "p99_ms": times[min(len(times) - 1, int(0.99 * len(times)))],
        "read_mb": statistics.median(read) / 2**20,
        "states_mb": sum(s.numel() * s.element_size() for _, s in loaded) / 2**20,
    }


def _moto() -> tuple[subprocess.Popen, dict[str, str]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(150):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    import boto3

    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket="bench")
    return proc, {
        "aws_endpoint": endpoint,
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
        "aws_region": "us-east-1",
        "allow_http": "true",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--nano", type=int, default=10_000)
    parser.add_argument("--s3", type=int, default=10_000)
    parser.add_argument("--trials", type=int, default=50)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kalm-lookup-"))
    print(
        "| shape | store | write s | p50 ms | p99 ms | read MB per lookup | states MB |"
    )
    print("|---|---|---|---|---|---|---|")
    shapes = [
        ("local, 64 x 64 fp32", args.small, 64, torch.float32),
        ("local, Nano bf16", args.nano, 640, torch.bfloat16),
    ]
    try:
        for label, count, hidden, dtype in shapes:
            for kind, uri in (
                ("directory", str(root / f"{hidden}-dir")),
                ("lance", str(root / f"{hidden}.lance")),
            ):
                wrote = _write(uri, count, hidden, dtype, None)
                r = _lookups(uri, count, args.trials, None)
                print(
                    f"| {label}, {count:,} | {kind} | {wrote:.0f} | "
                    f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['read_mb']:.2f} | "
                    f"{r['states_mb']:.2f} |",
                    flush=True,
                )
                shutil.rmtree(uri, ignore_errors=True)
        if args.s3:
            proc, options = _moto()
            try:
                uri = "s3://bench/nano.lance"
                wrote = _write(uri, args.s3, 640, torch.bfloat16, options)
                r = _lookups(uri, args.s3, min(args.trials, 20), options)
                print(
                    f"| S3 (moto), Nano bf16, {args.s3:,} | lance | {wrote:.0f} | "
                    f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['read_mb']:.2f} | "
                    f"{r['states_mb']:.2f} |",
                    flush=True,
                )
            finally:
                proc.terminate()
                proc.wait()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
