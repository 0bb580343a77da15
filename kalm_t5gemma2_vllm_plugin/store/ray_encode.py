# SPDX-License-Identifier: Apache-2.0
"""Encode a corpus into a Lance passage store on Ray (``kalm-vllm-encode --ray``).

Flow::

    driver: read the corpus (Ray Data) -> hash pass: (id, text sha256) per row,
            validated in the workers -> the store's text hashes -> todo ids
    workers (an actor pool of ``PassageEncoder``, one per GPU or N CPU actors):
            todo rows -> windows -> pooled states -> ``passage_table`` rows ->
            Lance fragment files (uncommitted) -> fragment metadata
    driver: every ``commit_every`` documents, one Lance ``Append`` commit of
            their fragments, then ``supersede`` of the rows they replace

Why the workers write fragments and the driver commits them, rather than one
``Dataset.write_lance`` per chunk: a ``write_lance`` is one commit per Ray
Data execution, and every execution starts its own actor pool, so per-chunk
writes would reload the encoder and rescan the corpus for every commit. Here
one pool serves the whole run, states go from the worker straight to storage
(never through the driver or the object store) and a commit is a small
manifest write. It is what Ray Data's Lance writer does inside (fragments in
the tasks, one commit at the end), with the commit repeated per chunk.

Fault tolerance: a killed actor is restarted and its batch redone (Ray Data's
actor pools retry lost tasks); the fragments the dead attempt may have written
are never committed, so nothing is stored twice. A killed driver loses at most
the uncommitted chunk: a re-run skips every committed document by its text
hash. Rows of one run share its ``run_id`` and ``written_at``; a reader uses a
document's rows with the greatest ``written_at``, so appending before
superseding is safe at any moment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlparse

from kalm_t5gemma2_vllm_plugin.errors import KaLMConfigError, KaLMInputError
from kalm_t5gemma2_vllm_plugin.store.format import StoreIdentity
from kalm_t5gemma2_vllm_plugin.windows import (
    DEFAULT_MAX_WINDOWS,
    DEFAULT_WINDOW_OVERLAP,
)

__all__ = ["encode_corpus_ray"]

logger = logging.getLogger(__name__)

#: CPU threads per encoder actor when ``workers`` is not given (no GPUs).
DEFAULT_THREADS_PER_WORKER = 4
_EXTRA = "pip install 'kalm-t5gemma2-vllm-plugin[ray]'"
#: The test hook: an actor whose first batch finds this file removes it and
#: dies, as a preempted worker would (``KALM_*`` variables are read here only).
CRASH_MARKER_ENV = "KALM_RAY_ENCODE_CRASH_MARKER"


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise KaLMConfigError(
            f"kalm-vllm-encode --ray needs Ray Data, which is not installed "
            f"({exc}); install the extra: {_EXTRA}"
        ) from None
    return ray


def arrow_filesystem(uri: str, storage_options: dict[str, str] | None) -> Any:
    """The pyarrow filesystem for ``uri`` with Lance-style ``storage_options``
    (``aws_access_key_id``, ``aws_secret_access_key``, ``aws_region``,
    ``aws_endpoint``, ``allow_http``), so the corpus and the store are reached
    with the same settings; ``None`` for a local path (Ray picks it)."""
    scheme = urlparse(uri).scheme
    if scheme in ("", "file"):
        return None
    if scheme not in ("s3", "s3a"):
        if storage_options:
            raise KaLMInputError(
                f"--input {uri}: storage options are supported for s3:// only",
                field="input",
            )
        return None
    from pyarrow import fs

    options = {k.lower(): v for k, v in (storage_options or {}).items()}
    kwargs: dict[str, Any] = {}
    if key := options.get("aws_access_key_id") or options.get("access_key_id"):
        kwargs["access_key"] = key
        kwargs["secret_key"] = options.get("aws_secret_access_key") or options.get(
            "secret_access_key"
        )
    if token := options.get("aws_session_token") or options.get("session_token"):
        kwargs["session_token"] = token
    if region := options.get("aws_region") or options.get("region"):
        kwargs["region"] = region
    if endpoint := options.get("aws_endpoint") or options.get("endpoint"):
        parsed = urlparse(endpoint)
        if parsed.scheme:
            kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
            kwargs["scheme"] = parsed.scheme
        else:
            kwargs["endpoint_override"] = endpoint
    if str(options.get("allow_http", "")).lower() == "true":
        kwargs.setdefault("scheme", "http")
    return fs.S3FileSystem(**kwargs)


def _input_format(uri: str) -> str:
    name = PurePosixPath(urlparse(uri).path).name.lower()
    for suffix in (".gz", ".zst", ".bz2"):
        name = name.removesuffix(suffix)
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "json"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    raise KaLMInputError(
        f"--input {uri}: with --ray the corpus is JSONL (.jsonl, .json) or "
        f"Parquet (.parquet); say which by its name",
        field="input",
    )


def _read_corpus(ray: Any, uri: str, filesystem: Any) -> Any:
    """Rows ``{id, text, where, problem}``: ``where`` names the row the way
    ``encode_corpus`` does (``path:line`` for JSONL), ``problem`` is the
    ``KaLMInputError`` message of a malformed row (its id and text null).

    JSONL is read as whole files and parsed by the project's own line reader
    rather than by ``ray.data.read_json``: pyarrow's JSON reader cannot name a
    bad line, and Ray's fallback (``json.load``) then fails on any JSONL.
    """
    if _input_format(uri) == "json":
        files = ray.data.read_binary_files(
            uri, filesystem=filesystem, include_paths=True
        )
        return files.map_batches(_parse_jsonl, batch_size=1, batch_format="pyarrow")
    return ray.data.read_parquet(
        uri, filesystem=filesystem, columns=["id", "text"], include_paths=True
    ).map_batches(_check_parquet, batch_format="pyarrow")


_ROWS_PER_BLOCK = 8192
_Row = tuple[str | None, str | None, str, str | None]


def _parsed_table(rows: list[_Row]) -> Any:
    import pyarrow as pa

    columns = list(zip(*rows, strict=True)) if rows else [(), (), (), ()]
    return pa.table(
        {
            name: pa.array(values, pa.string())
            for name, values in zip(
                ("id", "text", "where", "problem"), columns, strict=True
            )
        }
    )


def _parse_jsonl(batch: Any) -> Iterator[Any]:
    """JSONL files -> their rows, validated as ``encode_corpus`` validates."""
    import io

    from kalm_t5gemma2_vllm_plugin.store.encoder import _row
    from kalm_t5gemma2_vllm_plugin.validation import read_jsonl

    for data, path in zip(
        batch.column("bytes").to_pylist(),
        batch.column("path").to_pylist(),
        strict=True,
    ):
        rows: list[_Row] = []
        for line_number, row in read_jsonl(io.BytesIO(data), path):
            where = f"{path}:{line_number}"
            try:
                rows.append((*_row(row, where), where, None))
            except KaLMInputError as exc:
                rows.append((None, None, where, str(exc)))
            if len(rows) == _ROWS_PER_BLOCK:
                yield _parsed_table(rows)
                rows = []
        if rows:
            yield _parsed_table(rows)


def _check_parquet(batch: Any) -> Any:
    """Parquet rows -> validated rows; a row is named by its file and id."""
    from kalm_t5gemma2_vllm_plugin.validation import unicode_problem

    rows: list[_Row] = []
    for doc_id, text, path in zip(
        *(batch.column(c).to_pylist() for c in ("id", "text", "path")), strict=True
    ):
        where = f"{path}: id {doc_id!r}" if isinstance(doc_id, str) else str(path)
        problem = None
        if not isinstance(doc_id, str) or not isinstance(text, str):
            problem = f"{where}: a row must have string fields 'id' and 'text'"
        else:
            for key, value in (("id", doc_id), ("text", text)):
                if (why := unicode_problem(value)) is not None:
                    problem = f"{where}: field {key!r} {why}"
                    break
        rows.append(
            (None, None, where, problem) if problem else (doc_id, text, where, None)
        )
    return _parsed_table(rows)


def _hash_batch(batch: Any) -> Any:
    """The texts replaced by their sha256: only hashes reach the driver."""
    import pyarrow as pa

    from kalm_t5gemma2_vllm_plugin.store.format import text_sha256

    hashes = [
        None if t is None else text_sha256(t) for t in batch.column("text").to_pylist()
    ]
    return batch.drop_columns(["text"]).append_column(
        "text_sha256", pa.array(hashes, pa.string())
    )


def _keep_todo(batch: Any, todo: Any) -> Any:
    import pyarrow.compute as pc

    return batch.filter(pc.fill_null(pc.is_in(batch.column("id"), todo), False))


class EncoderActor:
    """One encoder per actor: todo rows -> their windows' pooled states ->
    Lance fragment files (uncommitted); returns the fragments' metadata and
    which documents (with how many windows) they hold."""

    def __init__(
        self,
        *,
        model_path: str,
        chunk_size: int | None,
        document_max_length: int,
        dtype: str,
        threads: int | None,
        batch_size: int,
        long_document: str,
        window_overlap: int,
        max_windows: int,
        store_uri: str,
        identity: StoreIdentity,
        hidden: int,
        run_id: str,
        written_at: int,
        storage_options: dict[str, str] | None,
    ) -> None:
        import torch

        from kalm_t5gemma2_vllm_plugin.store.encoder import PassageEncoder
        from kalm_t5gemma2_vllm_plugin.store.lance import schema_for

        if threads is not None:
            torch.set_num_threads(threads)
        self.encoder = PassageEncoder(
            model_path,
            chunk_size=chunk_size,
            document_max_length=document_max_length,
            dtype=dtype,
        )
        self.batch_size = batch_size
        self.policy = (long_document, window_overlap, max_windows)
        self.store_uri = store_uri
        self.storage_options = storage_options
        self.run = {"run_id": run_id, "written_at": written_at}
        self.schema = schema_for(identity, hidden)

    def __call__(self, batch: Any) -> Any:
        import lance
        import pyarrow as pa

        from kalm_t5gemma2_vllm_plugin.store.format import PassageRecord, text_sha256
        from kalm_t5gemma2_vllm_plugin.store.lance import passage_table

        _maybe_crash()
        long_document, overlap, max_windows = self.policy
        # (id, text sha256, window, of how many) per window of the batch.
        pending: list[tuple[str, str, int, int, Any]] = []
        for doc_id, text in zip(
            batch.column("id").to_pylist(),
            batch.column("text").to_pylist(),
            strict=True,
        ):
            try:
                windows = self.encoder.windows(
                    text, long_document, overlap, max_windows
                )
            except KaLMInputError as exc:
                raise KaLMInputError(f"id {doc_id!r}: {exc}", field="text") from None
            digest = text_sha256(text)
            pending.extend(
                (doc_id, digest, k, len(windows), w) for k, w in enumerate(windows)
            )
        items = []
        for start in range(0, len(pending), self.batch_size):
            part = pending[start : start + self.batch_size]
            results = self.encoder.encode([w.text for *_, w in part])
            for (doc_id, digest, k, n, w), (states, tokens, cut, key) in zip(
                part, results, strict=True
            ):
                record = PassageRecord(
                    doc_id,
                    digest,
                    len(states),
                    tokens,
                    cut,
                    key,
                    window=k,
                    windows=n,
                    token_start=w.token_start,
                    token_end=w.token_end,
                )
                items.append((record, states))
        ids = list(dict.fromkeys(doc_id for doc_id, *_ in pending))
        fragments: list[str] = []
        if items:
            table = passage_table(items, schema=self.schema, **self.run)
            written = lance.fragment.write_fragments(
                table,
                self.store_uri,
                schema=self.schema,
                storage_options=self.storage_options,
            )
            fragments = [json.dumps(f.to_json()) for f in written]
        return pa.table(
            {
                "fragments": pa.array([fragments], pa.list_(pa.string())),
                "ids": pa.array([ids], pa.list_(pa.string())),
                "rows": pa.array([len(items)], pa.int64()),
            }
        )


def _maybe_crash() -> None:
    marker = os.environ.get(CRASH_MARKER_ENV)
    if marker:
        with contextlib.suppress(FileNotFoundError):
            os.remove(marker)
            os._exit(1)


@contextlib.contextmanager
def _ray_session(ray: Any, address: str | None) -> Iterator[None]:
    """Connect to ``address`` (or start a local instance); an instance this
    process already holds (a caller's ``ray.init``) is used as it is."""
    if ray.is_initialized():
        yield
        return
    ray.init(
        address=address,
        log_to_driver=False,
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
    )
    try:
        yield
    finally:
        ray.shutdown()


def _user_error(exc: BaseException) -> KaLMInputError | None:
    """The ``KaLMInputError`` a worker raised, out of Ray's wrappers."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KaLMInputError):
            return current
        seen.add(id(current))
        cause = getattr(current, "cause", None)
        current = cause if isinstance(cause, BaseException) else current.__cause__
    return None


def encode_corpus_ray(
    address: str | None,
    model_path: str,
    input_uri: str,
    store_uri: str,
    *,
    identity: StoreIdentity,
    chunk_size: int | None,
    document_max_length: int,
    dtype: str,
    batch_size: int,
    commit_every: int = 10_000,
    workers: int | None = None,
    long_document: str = "truncate",
    window_overlap: int = DEFAULT_WINDOW_OVERLAP,
    max_windows: int = DEFAULT_MAX_WINDOWS,
    storage_options: dict[str, str] | None = None,
    invalid: list[KaLMInputError] | None = None,
) -> dict[str, int]:
    """Encode what the Lance store at ``store_uri`` lacks, on Ray; returns
    counts (encoded, skipped, total, windows written, commits).

    ``address``: a Ray cluster (``"auto"``, ``"ray://host:10001"``, a GCS
    address); ``None`` starts a local instance. The corpus is JSONL or Parquet
    of ``{id, text}`` rows, local or ``s3://`` (reached with
    ``storage_options``, as the store is). A malformed row stops the run
    before anything is encoded, unless ``invalid`` is given (then it is
    collected there and left out). ``commit_every`` documents are committed
    at a time; a document's windows always commit together.

    Example:
        >>> counts = encode_corpus_ray(None, ckpt, "corpus.jsonl",
        ...     "store.lance", identity=identity, chunk_size=4,
        ...     document_max_length=1024, dtype="float32", batch_size=16)
        >>> counts
        {'encoded': 13, 'skipped': 0, 'total': 13, 'windows': 13, 'commits': 1}
    """
    from kalm_t5gemma2_vllm_plugin.validation import check_positive_int

    check_positive_int(commit_every, "commit_every")
    check_positive_int(batch_size, "batch_size")
    if workers is not None:
        check_positive_int(workers, "workers")
    from kalm_t5gemma2_vllm_plugin.store.uri import (
        is_lance_uri,
        storage_options_from_env,
    )

    if not is_lance_uri(store_uri):
        raise KaLMInputError(
            f"--store {store_uri}: --ray writes a Lance store; give a path ending "
            f"in .lance or an object store URI (s3://bucket/store.lance)",
            field="store",
        )
    # Resolved here, once: the workers (other processes, other nodes) write
    # with exactly the options the driver commits with.
    storage_options = {**storage_options_from_env(), **(storage_options or {})}
    ray = _import_ray()
    filesystem = arrow_filesystem(input_uri, storage_options)
    _input_format(input_uri)
    with _ray_session(ray, address):
        try:
            return _run(
                ray,
                model_path,
                input_uri,
                store_uri,
                filesystem=filesystem,
                identity=identity,
                chunk_size=chunk_size,
                document_max_length=document_max_length,
                dtype=dtype,
                batch_size=batch_size,
                commit_every=commit_every,
                workers=workers,
                long_document=long_document,
                window_overlap=window_overlap,
                max_windows=max_windows,
                storage_options=storage_options,
                invalid=invalid,
            )
        except Exception as exc:
            if (user := _user_error(exc)) is not None and user is not exc:
                raise KaLMInputError(str(user), field=user.field) from None
            raise


def _hidden_size(model_path: str) -> int:
    from transformers import AutoConfig

    from kalm_t5gemma2_vllm_plugin.t5gemma2 import text_configs

    return int(text_configs(AutoConfig.from_pretrained(model_path))[0].hidden_size)


def _pool(ray: Any, workers: int | None) -> tuple[int, int | None, dict[str, Any]]:
    """(actors, torch threads per actor, Ray resources per actor)."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus and workers is None:
        return gpus, None, {"num_gpus": 1}
    cpus = max(1, int(resources.get("CPU", 1)))
    if workers is None:
        workers = max(1, cpus // DEFAULT_THREADS_PER_WORKER)
    threads = max(1, cpus // workers)
    return workers, threads, {"num_cpus": threads}


def _run(
    ray: Any,
    model_path: str,
    input_uri: str,
    store_uri: str,
    *,
    filesystem: Any,
    identity: StoreIdentity,
    chunk_size: int | None,
    document_max_length: int,
    dtype: str,
    batch_size: int,
    commit_every: int,
    workers: int | None,
    long_document: str,
    window_overlap: int,
    max_windows: int,
    storage_options: dict[str, str] | None,
    invalid: list[KaLMInputError] | None,
) -> dict[str, int]:
    import lance
    import pyarrow as pa

    from kalm_t5gemma2_vllm_plugin.store.encoder import is_current
    from kalm_t5gemma2_vllm_plugin.store.lance import LanceStoreWriter
    from kalm_t5gemma2_vllm_plugin.store.uri import open_writer

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    corpus = _read_corpus(ray, input_uri, filesystem)
    hashes = _hash_pass(corpus, input_uri, invalid)
    writer = open_writer(store_uri, identity, storage_options=storage_options)
    assert isinstance(writer, LanceStoreWriter)  # is_lance_uri(store_uri)
    try:
        stored = writer.text_hashes()
        todo = [
            i
            for i, digest in hashes.items()
            if not is_current(stored.get(i), digest, long_document)
        ]
        counts = {
            "encoded": len(todo),
            "skipped": len(hashes) - len(todo),
            "total": len(hashes),
            "windows": 0,
            "commits": 0,
        }
        if not todo:
            return counts
        # Created before the workers write into it (with the writer's own
        # schema and index); the actors' fragments must match its schema.
        writer.ensure_created(_hidden_size(model_path))
        actors, threads, resources = _pool(ray, workers)
        run = {"run_id": uuid.uuid4().hex, "written_at": time.time_ns()}
        # Documents per actor call: one encoder batch, and small enough that
        # every actor has work in a chunk.
        per_call = max(1, min(batch_size, -(-commit_every // actors)))
        # The todo rows are read and kept (in the object store, spilled to disk
        # when large) before the actors start, in blocks of one actor call
        # each (so every actor has work): the actors may hold every CPU, and
        # a read or repartition task queued behind them would wait forever.
        pending = (
            corpus.map_batches(
                _keep_todo,
                batch_format="pyarrow",
                fn_kwargs={"todo": pa.array(todo, pa.string())},
            )
            .repartition(target_num_rows_per_block=per_call)
            .materialize()
        )
        encoded = pending.map_batches(
            EncoderActor,
            batch_size=per_call,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors),
            fn_constructor_kwargs={
                "model_path": model_path,
                "chunk_size": chunk_size,
                "document_max_length": document_max_length,
                "dtype": dtype,
                "threads": threads,
                "batch_size": batch_size,
                "long_document": long_document,
                "window_overlap": window_overlap,
                "max_windows": max_windows,
                "store_uri": store_uri,
                "identity": identity,
                "hidden": _hidden_size(model_path),
                "storage_options": storage_options,
                **run,
            },
            **resources,
        )
        fragments: list[Any] = []
        ids: list[str] = []
        rows = 0

        def commit() -> None:
            nonlocal rows
            if fragments:
                lance.LanceDataset.commit(
                    store_uri,
                    lance.LanceOperation.Append(list(fragments)),
                    read_version=lance.dataset(
                        store_uri, storage_options=storage_options
                    ).version,
                    storage_options=storage_options,
                )
            writer.supersede(list(ids), run["written_at"])
            counts["windows"] += rows
            counts["commits"] += 1
            logger.info("committed %d documents (%d windows)", len(ids), rows)
            fragments.clear()
            ids.clear()
            rows = 0

        for result in encoded.iter_rows():
            fragments.extend(
                lance.fragment.FragmentMetadata.from_json(f)
                for f in result["fragments"]
            )
            ids.extend(result["ids"])
            rows += int(result["rows"])
            if len(ids) >= commit_every:
                commit()
        if ids:
            commit()
        return counts
    finally:
        writer.close()


def _hash_pass(
    corpus: Any, input_uri: str, invalid: list[KaLMInputError] | None
) -> dict[str, str]:
    """{id: text sha256} of every valid row; the first malformed row (or
    duplicate id) is raised, or collected in ``invalid`` and left out."""
    hashes: dict[str, str] = {}
    where: dict[str, str] = {}
    hashed = corpus.map_batches(_hash_batch, batch_format="pyarrow")
    for batch in hashed.iter_batches(batch_format="pyarrow", batch_size=None):
        for doc_id, row_at, problem, digest in zip(
            *(batch.column(c).to_pylist() for c in _HASH_COLUMNS), strict=True
        ):
            if problem is None and doc_id in hashes:
                # Always an error, as in encode_corpus: which text is meant?
                raise KaLMInputError(
                    f"{row_at}: duplicate id {doc_id!r} (first at {where[doc_id]})",
                    field="id",
                )
            if problem is not None:
                error = KaLMInputError(problem, field="id" if doc_id else None)
                if invalid is None:
                    raise error
                invalid.append(error)
                continue
            hashes[doc_id] = digest
            where[doc_id] = row_at
    return hashes


_HASH_COLUMNS = ("id", "where", "problem", "text_sha256")
