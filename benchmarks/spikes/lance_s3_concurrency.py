# SPDX-License-Identifier: Apache-2.0
"""Spike: concurrent appends to one Lance dataset on moto-server S3 and on disk.

Not part of the package and not a test: it needs its own environment, e.g.::

    python3.11 -m venv /tmp/lance-venv
    /tmp/lance-venv/bin/pip install pylance pyarrow 'moto[server]>=5.2.5' boto3 numpy
    /tmp/lance-venv/bin/python benchmarks/spikes/lance_s3_concurrency.py

What it does, on the local filesystem and on S3 served by moto (started here in
server mode on 127.0.0.1 at a free port, as a subprocess, ended at the end):

1. checks that the S3 server refuses ``PutObject`` with ``If-None-Match: *`` on
   an existing key (412), which Lance's S3 commits rely on;
2. concurrency, ``--rounds`` times: creates a dataset with the passage-store
   schema (store identity in the schema metadata), starts two writer
   processes that each append ``--appends`` batches of ``--rows`` rows at the
   same moment, then checks that every row a writer saw committed is there
   (count, ids, no duplicates, CRC-32 of every row's states) and that the
   identity survived;
3. lookups: ``--lookup-rows`` rows of ``--state-bytes`` of states in
   ``--fragments`` appends; looks up ``--lookup-ids`` random ids by id, as one
   ``IN`` filter (``--trials`` times) and one id at a time, without and then with
   a BTREE scalar index on ``id``: p50/p99 ms, and per lookup Lance's own read
   counters (IOPS, bytes) and, on S3, the requests and bytes the server saw.

moto runs as its own server app behind a small WSGI wrapper that logs every
request (method, path, status, length, ``If-None-Match``/``If-Match``/``Range``),
so the commit protocol is visible: Lance's manifest PUTs and their 412s.

Prints one JSON object per result on stdout; progress goes to stderr. Results
and the exact commands: ``lance-s3-findings.md`` beside this file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

IDENTITY_KEY = b"kalm.store_identity"
IDENTITY = {
    "model_fingerprint": "spike-0000",
    "encoder_chunk_size": 4,
    "document_max_length": 1024,
    "template_version": "1",
    "dtype": "bfloat16",
    "format_version": 4,
}
BUCKET = "bucket"


def _log(message: str) -> None:
    print(f"[spike {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def schema() -> pa.Schema:
    """The passage-store columns; the store identity lives in the metadata."""
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text_hash", pa.string(), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("window", pa.int32(), nullable=False),
        pa.field("token_start", pa.int32(), nullable=False),
        pa.field("token_end", pa.int32(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
        # bytes of a [C, d] array in the engine dtype
        pa.field("states", pa.large_binary(), nullable=False),
        pa.field("crc32", pa.uint32(), nullable=False),
    ]
    return pa.schema(fields, metadata={IDENTITY_KEY: json.dumps(IDENTITY).encode()})


def row_crc(row_id: str, states: bytes) -> int:
    return zlib.crc32(states, zlib.crc32(row_id.encode()))


def make_table(ids: list[str], state_bytes: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    blob = rng.integers(0, 256, size=len(ids) * state_bytes, dtype=np.uint8).tobytes()
    states = [blob[i * state_bytes : (i + 1) * state_bytes] for i in range(len(ids))]
    n = len(ids)
    return pa.table(
        {
            "id": ids,
            "text_hash": [hashlib.sha256(i.encode()).hexdigest() for i in ids],
            "num_tokens": pa.array(rng.integers(16, 1025, n), pa.int32()),
            "window": pa.array([0] * n, pa.int32()),
            "token_start": pa.array([0] * n, pa.int32()),
            "token_end": pa.array([256] * n, pa.int32()),
            "truncated": [False] * n,
            "states": pa.array(states, pa.large_binary()),
            "crc32": pa.array(
                [row_crc(i, s) for i, s in zip(ids, states, strict=True)], pa.uint32()
            ),
        },
        schema=schema(),
    )


# --- moto server ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_moto(port: int, log_path: str) -> int:
    """Subprocess mode: moto's own server app, one JSON line per request.

    The same app and request handler as ``moto_server``; the wrapper only logs
    method, path, status, body length and the conditional and range headers.
    """
    import threading

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import run_simple

    os.environ.setdefault("MOTO_PORT", str(port))
    app = DomainDispatcherApplication(create_backend_app)
    log = open(log_path, "a", buffering=1)
    lock = threading.Lock()

    def logged(environ: dict[str, Any], start_response: Any) -> Any:
        rec: dict[str, Any] = {
            "m": environ["REQUEST_METHOD"],
            "p": environ.get("PATH_INFO", ""),
            "inm": environ.get("HTTP_IF_NONE_MATCH"),
            "im": environ.get("HTTP_IF_MATCH"),
            "range": environ.get("HTTP_RANGE"),
        }

        def respond(
            status: str, headers: list[tuple[str, str]], exc: Any = None
        ) -> Any:
            rec["s"] = int(status.split()[0])
            rec["len"] = next(
                (int(v) for k, v in headers if k.lower() == "content-length"), 0
            )
            return start_response(status, headers, exc)

        t0 = time.perf_counter()
        body = app(environ, respond)
        rec["ms"] = round(1e3 * (time.perf_counter() - t0), 2)
        with lock:
            log.write(json.dumps(rec) + "\n")
        return body

    run_simple(
        "127.0.0.1", port, logged, threaded=True, request_handler=MotoRequestHandler
    )
    return 0


@contextmanager
def moto_server(log_path: Path) -> Iterator[str]:
    """moto in server mode as a subprocess; yields its endpoint URL."""
    port = _free_port()
    cmd = [sys.executable, __file__, "--serve-moto", str(port)]
    cmd += ["--request-log", str(log_path)]
    out = open(log_path.with_suffix(".out"), "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto did not start: {log_path}.out") from None
                time.sleep(0.2)
        _log(f"moto server pid {proc.pid} at {endpoint}")
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.close()


def s3_options(endpoint: str) -> dict[str, str]:
    return {
        "aws_endpoint": endpoint,
        "aws_region": "us-east-1",
        "allow_http": "true",
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
    }


def _boto(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def check_conditional_put(endpoint: str) -> dict[str, Any]:
    """Does the server refuse a create-if-absent PUT on an existing key?"""
    s3 = _boto(endpoint)
    s3.put_object(Bucket=BUCKET, Key="probe/x", Body=b"1", IfNoneMatch="*")
    try:
        s3.put_object(Bucket=BUCKET, Key="probe/x", Body=b"2", IfNoneMatch="*")
        second = "accepted (overwrote)"
    except s3.exceptions.ClientError as e:
        meta = e.response.get("ResponseMetadata", {})
        second = f"{meta.get('HTTPStatusCode')} {e.response['Error'].get('Code')}"
    body = s3.get_object(Bucket=BUCKET, Key="probe/x")["Body"].read()
    return {"second_put_if_none_match": second, "body_after": body.decode()}


class RequestCounter:
    """What the S3 server saw between start() and stop(), from its request log."""

    def __init__(self, log_path: Path | None) -> None:
        self.log_path = log_path
        self._start = 0

    def _records(self) -> list[dict[str, Any]]:
        if self.log_path is None:
            return []
        lines = self.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def start(self) -> None:
        time.sleep(0.05)
        self._start = len(self._records())

    def stop(self) -> dict[str, Any]:
        time.sleep(0.05)
        recs = self._records()[self._start :]
        if self.log_path is None:
            return {}
        manifests = [r for r in recs if r["m"] == "PUT" and "/_versions/" in r["p"]]
        return {
            "requests": dict(Counter(r["m"] for r in recs)),
            "get_bytes": sum(r["len"] for r in recs if r["m"] == "GET"),
            "server_ms": round(sum(r.get("ms", 0.0) for r in recs), 1),
            "ranged_gets": sum(1 for r in recs if r["m"] == "GET" and r["range"]),
            "manifest_puts": len(manifests),
            "manifest_puts_if_none_match": sum(1 for r in manifests if r["inm"]),
            "manifest_puts_if_match": sum(1 for r in manifests if r["im"]),
            "manifest_put_status": dict(Counter(str(r["s"]) for r in manifests)),
            "statuses": dict(Counter(str(r["s"]) for r in recs)),
        }


# --- concurrency -----------------------------------------------------------------


def writer_main(args: argparse.Namespace) -> int:
    """One writer process: appends its batches, prints what it saw committed."""
    import lance

    opts = json.loads(args.storage_options) if args.storage_options else None
    while time.time() < args.start_at:
        time.sleep(0.001)
    committed: list[str] = []
    errors: list[str] = []
    times: list[float] = []
    began = time.time()
    for i in range(args.appends):
        ids = [f"w{args.writer}-a{i:03d}-r{j:03d}" for j in range(args.rows)]
        table = make_table(ids, args.state_bytes, seed=args.writer * 10_000 + i)
        t0 = time.perf_counter()
        try:
            lance.write_dataset(table, args.uri, mode="append", storage_options=opts)
            committed.extend(ids)
        except Exception as e:  # noqa: BLE001 - the spike records every failure
            errors.append(f"{type(e).__name__}: {e}")
        times.append(time.perf_counter() - t0)
    span = [began, time.time()]
    print(
        json.dumps(
            {"committed": committed, "errors": errors, "times": times, "span": span}
        )
    )
    return 0


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run_concurrency(
    where: str,
    uri: str,
    opts: dict[str, str] | None,
    args: argparse.Namespace,
    counter: RequestCounter,
) -> dict[str, Any]:
    import lance

    lance.write_dataset(
        schema().empty_table(), uri, mode="create", storage_options=opts
    )
    counter.start()
    start_at = time.time() + 2.0
    procs = []
    tmp = Path(tempfile.mkdtemp(prefix="lance-writer-"))
    for w in (0, 1):
        cmd = [sys.executable, __file__, "--writer", str(w), "--uri", uri]
        cmd += ["--appends", str(args.appends), "--rows", str(args.rows)]
        cmd += ["--state-bytes", str(args.write_state_bytes)]
        cmd += ["--start-at", repr(start_at)]
        cmd += ["--storage-options", json.dumps(opts) if opts else ""]
        err = open(tmp / f"w{w}.err", "w")
        procs.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err), err))
    results = []
    for proc, err in procs:
        out, _ = proc.communicate(timeout=600)
        err.close()
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    seen_by_s3 = counter.stop()
    stderr = [(tmp / f"w{w}.err").read_text()[-2000:] for w in (0, 1)]
    shutil.rmtree(tmp)

    ds = lance.dataset(uri, storage_options=opts)
    table = ds.to_table(columns=["id", "states", "crc32"])
    ids = table.column("id").to_pylist()
    bad_crc = sum(
        row_crc(i, s) != c
        for i, s, c in zip(
            ids,
            table.column("states").to_pylist(),
            table.column("crc32").to_pylist(),
            strict=True,
        )
    )
    committed = set(results[0]["committed"]) | set(results[1]["committed"])
    meta = ds.schema.metadata or {}
    times = results[0]["times"] + results[1]["times"]
    (a0, a1), (b0, b1) = results[0]["span"], results[1]["span"]
    overlap = max(0.0, min(a1, b1) - max(a0, b0)) / max(a1 - a0, b1 - b0)
    return {
        "section": "concurrency",
        "where": where,
        "uri": uri,
        "committed_by_writers": [len(r["committed"]) for r in results],
        "rows_in_dataset": ds.count_rows(),
        "distinct_ids": len(set(ids)),
        "missing_committed": len(committed - set(ids)),
        "unexpected_ids": len(set(ids) - committed),
        "bad_crc": bad_crc,
        "identity_intact": json.loads(meta.get(IDENTITY_KEY, b"null")) == IDENTITY,
        "version": ds.version,
        "versions": len(ds.versions()),
        "fragments": len(ds.get_fragments()),
        "writer_errors": results[0]["errors"] + results[1]["errors"],
        "writer_stderr": [s for s in stderr if s.strip()],
        "writers_overlap": round(overlap, 2),
        "s3_during_appends": seen_by_s3 or None,
        "append_ms_p50": round(1e3 * _pct(times, 50), 1),
        "append_ms_max": round(1e3 * max(times), 1) if times else None,
        "ok": (
            not (committed - set(ids))
            and len(ids) == len(set(ids)) == len(committed)
            and bad_crc == 0
        ),
    }


# --- lookups ---------------------------------------------------------------------


def _in_filter(ids: list[str]) -> str:
    return "id IN (" + ", ".join(f"'{i}'" for i in ids) + ")"


def _check(table: pa.Table, wanted: list[str]) -> None:
    got = table.column("id").to_pylist()
    assert sorted(got) == sorted(wanted), (len(got), len(wanted))
    for i, s, c in zip(
        got,
        table.column("states").to_pylist(),
        table.column("crc32").to_pylist(),
        strict=True,
    ):
        assert row_crc(i, s) == c, i


def _io(ds: Any) -> tuple[int, int]:
    """Lance's own read counters (IOPS, bytes) since the last call."""
    stats = ds.io_stats_incremental()
    return int(stats.read_iops), int(stats.read_bytes)


def _measure(
    ds: Any, all_ids: list[str], args: argparse.Namespace, counter: RequestCounter
) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    cols = ["id", "states", "crc32"]
    first = rng.choice(len(all_ids), args.lookup_ids, replace=False)
    wanted = [all_ids[k] for k in first]
    t0 = time.perf_counter()
    _check(ds.to_table(columns=cols, filter=_in_filter(wanted)), wanted)
    cold_ms = 1e3 * (time.perf_counter() - t0)

    batch_ms = []
    counter.start()
    _io(ds)
    for _ in range(args.trials):
        wanted = [all_ids[k] for k in rng.choice(len(all_ids), args.lookup_ids, False)]
        t0 = time.perf_counter()
        table = ds.to_table(columns=cols, filter=_in_filter(wanted))
        batch_ms.append(1e3 * (time.perf_counter() - t0))
        _check(table, wanted)
    batch_requests = counter.stop()
    batch_iops, batch_bytes = _io(ds)

    single_ms = []
    wanted = [all_ids[k] for k in rng.choice(len(all_ids), args.lookup_ids, False)]
    counter.start()
    for one in wanted:
        t0 = time.perf_counter()
        table = ds.to_table(columns=cols, filter=f"id = '{one}'")
        single_ms.append(1e3 * (time.perf_counter() - t0))
        _check(table, [one])
    single_requests = counter.stop()
    single_iops, single_bytes = _io(ds)

    def per(seen: dict[str, Any], n: int) -> dict[str, Any] | None:
        if not seen:
            return None
        return {
            "requests": {k: round(v / n, 1) for k, v in seen["requests"].items()},
            "ranged_gets": round(seen["ranged_gets"] / n, 1),
            "get_kib": round(seen["get_bytes"] / n / 1024, 1),
            # time moto itself spent answering (its handler, not the network)
            "server_ms": round(seen["server_ms"] / n, 1),
        }

    return {
        "first_batch_ms": round(cold_ms, 1),
        "batch_of_ids": args.lookup_ids,
        "batch_ms_p50": round(_pct(batch_ms, 50), 2),
        "batch_ms_p99": round(_pct(batch_ms, 99), 2),
        "single_ms_p50": round(_pct(single_ms, 50), 2),
        "single_ms_p99": round(_pct(single_ms, 99), 2),
        "s3_per_batch": per(batch_requests, args.trials),
        "s3_per_single": per(single_requests, args.lookup_ids),
        "lance_read_iops_per_batch": round(batch_iops / args.trials, 1),
        "lance_read_kib_per_batch": round(batch_bytes / args.trials / 1024, 1),
        "lance_read_iops_per_single": round(single_iops / args.lookup_ids, 1),
        "lance_read_kib_per_single": round(single_bytes / args.lookup_ids / 1024, 1),
    }


def run_lookups(
    where: str,
    uri: str,
    opts: dict[str, str] | None,
    args: argparse.Namespace,
    counter: RequestCounter,
) -> dict[str, Any]:
    import lance

    per_frag = args.lookup_rows // args.fragments
    all_ids: list[str] = []
    t0 = time.perf_counter()
    for f in range(args.fragments):
        ids = [f"doc-{f:02d}-{j:06d}" for j in range(per_frag)]
        table = make_table(ids, args.state_bytes, seed=f)
        mode = "create" if f == 0 else "append"
        lance.write_dataset(table, uri, mode=mode, storage_options=opts)
        all_ids.extend(ids)
    write_s = time.perf_counter() - t0
    ds = lance.dataset(uri, storage_options=opts)
    result: dict[str, Any] = {
        "section": "lookup",
        "where": where,
        "rows": ds.count_rows(),
        "state_bytes": args.state_bytes,
        "fragments": len(ds.get_fragments()),
        "write_s": round(write_s, 2),
        "bytes_on_store": _store_bytes(uri, opts),
    }
    _log(f"{where}: lookups without index")
    result["no_index"] = _measure(ds, all_ids, args, counter)
    t0 = time.perf_counter()
    ds.create_scalar_index("id", index_type="BTREE")
    result["index_build_s"] = round(time.perf_counter() - t0, 2)
    ds = lance.dataset(uri, storage_options=opts)
    result["indices"] = [str(i) for i in ds.describe_indices()]
    _log(f"{where}: lookups with BTREE index")
    result["btree"] = _measure(ds, all_ids, args, counter)
    return result


def _store_bytes(uri: str, opts: dict[str, str] | None) -> int:
    if not uri.startswith("s3://"):
        return sum(p.stat().st_size for p in Path(uri).rglob("*") if p.is_file())
    s3 = _boto(opts["aws_endpoint"])  # type: ignore[index]
    prefix = uri[len(f"s3://{BUCKET}/") :].rstrip("/") + "/"
    total = 0
    for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=prefix
    ):
        total += sum(o["Size"] for o in page.get("Contents", []))
    return total


# --- main ------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for dist in ("pylance", "pyarrow", "moto", "boto3", "numpy"):
        try:
            out[dist] = version(dist)
        except Exception:  # noqa: BLE001
            out[dist] = "absent"
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        out["cpu"] = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in cpu.splitlines()
                if "Model name" in ln
            ),
            platform.machine(),
        )
    except OSError:
        out["cpu"] = platform.machine()
    out["cores"] = str(os.cpu_count())
    return out


def _section(
    where: str,
    base: str,
    opts: dict[str, str] | None,
    args: argparse.Namespace,
    counter: RequestCounter,
) -> None:
    for r in range(args.rounds):
        _log(f"{where}: concurrency round {r}")
        name = "store.lance" if r == 0 else f"store-r{r}.lance"
        result = run_concurrency(where, f"{base}/{name}", opts, args, counter)
        _emit(result | {"round": r})
    if args.lookup_rows:
        _emit(run_lookups(where, f"{base}/lookup.lance", opts, args, counter))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--appends", type=int, default=20, help="per writer")
    p.add_argument("--rows", type=int, default=50, help="per append")
    p.add_argument("--write-state-bytes", type=int, default=8 * 640 * 2)
    p.add_argument("--lookup-rows", type=int, default=10_000, help="0 skips lookups")
    p.add_argument("--state-bytes", type=int, default=16 * 1024)
    p.add_argument("--fragments", type=int, default=10)
    p.add_argument("--lookup-ids", type=int, default=100)
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--only", choices=("local", "s3"), default=None)
    # subprocess modes (internal)
    p.add_argument("--serve-moto", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--request-log", default="", help=argparse.SUPPRESS)
    p.add_argument("--writer", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--uri", default="", help=argparse.SUPPRESS)
    p.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--storage-options", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_moto is not None:
        return serve_moto(args.serve_moto, args.request_log)
    if args.writer is not None:
        return writer_main(args)

    internal = {"writer", "uri", "start_at", "storage_options"}
    internal |= {"serve_moto", "request_log"}
    settings = {k: v for k, v in vars(args).items() if k not in internal}
    _emit({"section": "settings", **_versions(), **settings})
    work = Path(tempfile.mkdtemp(prefix="lance-spike-"))
    try:
        if args.only in (None, "s3"):
            log = work / "moto.log"
            with moto_server(log) as endpoint:
                _boto(endpoint).create_bucket(Bucket=BUCKET)
                _emit({"section": "conditional_put", **check_conditional_put(endpoint)})
                opts = s3_options(endpoint)
                _section("s3", f"s3://{BUCKET}", opts, args, RequestCounter(log))
        if args.only in (None, "local"):
            (work / "local").mkdir()
            _section("local", str(work / "local"), None, args, RequestCounter(None))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
