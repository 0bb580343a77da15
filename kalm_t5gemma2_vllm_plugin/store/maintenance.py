# SPDX-License-Identifier: Apache-2.0
"""Whole-store operations behind ``kalm-vllm-store compact`` and ``migrate``."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any

from kalm_t5gemma2_vllm_plugin.errors import CorruptStoreError, KaLMInputError
from kalm_t5gemma2_vllm_plugin.store.uri import (
    PassageReader,
    _lance_module,
    _options,
    is_lance_uri,
    open_store,
    open_writer,
)

__all__ = ["compact_store", "migrate_store"]

#: Documents per migrated batch (all windows of each).
_DOCUMENTS_PER_BATCH = 256


def compact_store(
    uri: str | os.PathLike[str],
    *,
    older_than: timedelta = timedelta(hours=1),
    storage_options: Mapping[str, str] | None = None,
) -> dict[str, int] | None:
    """Compact a Lance store (``LanceStoreWriter.compact``); ``None`` for a
    directory store, which has nothing to compact (its writer removes
    replaced shards itself).

    Example:
        >>> compact_store("s3://bucket/store.lance")
        {'superseded': 3, 'fragments': 1, 'versions_removed': 7}
    """
    if not is_lance_uri(uri):
        return None
    lance = _lance_module(uri)
    options = _options(storage_options)
    identity = lance.LanceStore(uri, storage_options=options).identity
    writer = lance.LanceStoreWriter(uri, identity, storage_options=options)
    return writer.compact(older_than=older_than)  # type: ignore[no-any-return]


def migrate_store(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, str] | None = None,
) -> dict[str, int]:
    """Copy every document of ``source`` into ``target`` (created with the
    source's identity; either may be of either format), then read every row
    back from ``target`` and compare it with the source's.

    Raises ``CorruptStoreError`` naming the first row that differs.

    Example:
        >>> migrate_store("./kalm-store", "s3://bucket/store.lance")
        {'documents': 300, 'windows': 312}
    """
    if os.fspath(source) == os.fspath(target):
        raise KaLMInputError("migrate: the source and the target are the same store.")
    reader = open_store(source, storage_options=storage_options)
    try:
        identity = reader.identity
        ids = reader.ids()
        windows = 0
        with open_writer(target, identity, storage_options=storage_options) as writer:
            for _, loaded in _batches(reader, ids):
                windows += writer.write(loaded)
        copy = open_store(target, identity, storage_options=storage_options)
        try:
            _compare(reader, copy, ids)
        finally:
            copy.close()
    finally:
        reader.close()
    return {"documents": len(ids), "windows": windows}


def _batches(
    store: PassageReader, ids: Sequence[str]
) -> Iterator[tuple[list[str], list[tuple[Any, Any]]]]:
    """``(ids, (record, states) of all their windows)``, verified on read."""
    for start in range(0, len(ids), _DOCUMENTS_PER_BATCH):
        chunk = list(ids[start : start + _DOCUMENTS_PER_BATCH])
        records = store.window_records(chunk)
        keys = [(r.id, r.window) for i in chunk for r in records[i]]
        yield chunk, store.load_windows(keys)


def _compare(source: PassageReader, copy: PassageReader, ids: list[str]) -> None:
    import torch

    if copy.identity != source.identity or copy.ids() != ids:
        raise CorruptStoreError(
            "migrate: the target's identity or ids differ from the source's."
        )
    for chunk, expected in _batches(source, ids):
        records = copy.window_records(chunk)
        keys = [(r.id, r.window) for i in chunk for r in records[i]]
        got = copy.load_windows(keys)
        for (want, want_states), (have, have_states) in zip(
            expected, got, strict=False
        ):
            if have != want or not torch.equal(have_states, want_states):
                raise CorruptStoreError(
                    f"migrate: passage {want.id!r} window {want.window} differs in "
                    f"the target from the source.",
                    passage_id=want.id,
                )
        if len(got) != len(expected):
            raise CorruptStoreError(
                f"migrate: the target holds {len(got)} windows of a batch where the "
                f"source holds {len(expected)}."
            )
