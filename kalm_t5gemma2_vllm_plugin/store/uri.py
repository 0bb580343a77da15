# SPDX-License-Identifier: Apache-2.0
"""Which store format a location is, and opening it (``open_store``,
``open_writer``) with its storage options.

The rule: a URI with a scheme (``s3://``, ``gs://``, ``az://``, ``file://``)
or a path ending in ``.lance`` is a Lance store (``lance.py``); anything else
is a directory store (``format.py``). Storage options are passed to Lance
as they are: those in ``storage_options_from_env`` (the ``AWS_*`` variables),
with the caller's (``store_options=``, the CLIs' ``--store-option``) merged
over them. A directory store takes none.

Light tier: nothing here imports torch, pyarrow or lance until a store opens.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from kalm_t5gemma2_vllm_plugin.errors import KaLMConfigError, KaLMInputError

if TYPE_CHECKING:
    from kalm_t5gemma2_vllm_plugin.store.format import PassageRecord, StoreIdentity

__all__ = [
    "PassageReader",
    "PassageWriter",
    "is_lance_uri",
    "open_store",
    "open_writer",
    "parse_store_options",
    "storage_options_from_env",
]

#: Environment variable -> Lance storage option (the first set one wins).
_ENV_OPTIONS = (
    ("AWS_ENDPOINT_URL", "aws_endpoint"),
    ("AWS_ENDPOINT", "aws_endpoint"),
    ("AWS_ACCESS_KEY_ID", "aws_access_key_id"),
    ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
    ("AWS_REGION", "aws_region"),
    ("AWS_ALLOW_HTTP", "allow_http"),
)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class PassageReader(Protocol):
    """What an engine reads from a store of either format."""

    identity: StoreIdentity

    def __len__(self) -> int: ...
    def ids(self) -> list[str]: ...
    def records(self, ids: Sequence[str]) -> list[PassageRecord]: ...
    def get(self, ids: Sequence[str]) -> list[Any]: ...
    def load(self, ids: Sequence[str]) -> list[tuple[PassageRecord, Any]]: ...
    def window_records(self, ids: Sequence[str]) -> dict[str, list[PassageRecord]]: ...
    def load_windows(
        self, keys: Sequence[tuple[str, int]]
    ) -> list[tuple[PassageRecord, Any]]: ...
    def refresh(self) -> bool: ...
    def close(self) -> None: ...


class PassageWriter(Protocol):
    """What ``encode_corpus`` and ``migrate`` write through."""

    identity: StoreIdentity

    def text_hashes(self) -> dict[str, tuple[str, int, bool]]: ...
    def write(self, items: Any) -> int: ...
    def close(self) -> None: ...
    def __enter__(self) -> PassageWriter: ...
    def __exit__(self, *exc: object) -> None: ...


def is_lance_uri(uri: str | os.PathLike[str]) -> bool:
    """A scheme (``s3://``, ``file://``, ...) or a ``.lance`` path."""
    text = os.fspath(uri)
    return bool(_SCHEME.match(text)) or text.rstrip("/").endswith(".lance")


def storage_options_from_env(
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Lance storage options from ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT``),
    ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION`` and
    ``AWS_ALLOW_HTTP``. Never logged.

    Example:
        >>> storage_options_from_env({"AWS_REGION": "eu-west-1"})
        {'aws_region': 'eu-west-1'}
    """
    env = os.environ if environ is None else environ
    options: dict[str, str] = {}
    for variable, option in _ENV_OPTIONS:
        if env.get(variable) and option not in options:
            options[option] = env[variable]
    return options


def parse_store_options(pairs: Sequence[str] | None, flag: str) -> dict[str, str]:
    """``KEY=VALUE`` strings (``--store-option``) as a dict; later ones win."""
    options: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise KaLMInputError(f"{flag} takes KEY=VALUE, got {pair.split('=')[0]!r}")
        options[key.strip()] = value
    return options


def _options(storage_options: Mapping[str, str] | None) -> dict[str, str]:
    return {**storage_options_from_env(), **(storage_options or {})}


def open_store(
    uri: str | os.PathLike[str],
    expected: StoreIdentity | None = None,
    *,
    storage_options: Mapping[str, str] | None = None,
) -> PassageReader:
    """A reader of the store at ``uri``, of either format (see the module).

    Example:
        >>> store = open_store("s3://bucket/store.lance", expected)
        >>> store.records(["doc-1"])[0].windows
        1
    """
    if not is_lance_uri(uri):
        from kalm_t5gemma2_vllm_plugin.store.format import PassageStore

        return PassageStore(uri, expected)
    lance = _lance_module(uri)
    return lance.LanceStore(uri, expected, storage_options=_options(storage_options))


def open_writer(
    uri: str | os.PathLike[str],
    identity: StoreIdentity,
    *,
    storage_options: Mapping[str, str] | None = None,
) -> PassageWriter:
    """A writer of the store at ``uri``, of either format; creates it."""
    if not is_lance_uri(uri):
        from kalm_t5gemma2_vllm_plugin.store.format import PassageStoreWriter

        return PassageStoreWriter(uri, identity)
    lance = _lance_module(uri)
    return lance.LanceStoreWriter(
        uri, identity, storage_options=_options(storage_options)
    )


def _lance_module(uri: str | os.PathLike[str]) -> Any:
    try:
        import lance as _  # noqa: F401 - pylance, imported lazily by the store

        from kalm_t5gemma2_vllm_plugin.store import lance
    except ImportError as error:
        raise KaLMConfigError(
            f"{os.fspath(uri)} is a Lance store, which needs pylance and pyarrow: "
            f"pip install 'kalm-t5gemma2-vllm-plugin[lance]' ({error})."
        ) from None
    return lance
