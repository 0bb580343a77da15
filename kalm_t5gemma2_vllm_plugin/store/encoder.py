# SPDX-License-Identifier: Apache-2.0
"""Encode a corpus once into a passage store (``kalm-vllm-encode``).

Input rows are ``{"id", "text"}``. Passages already stored with the same text
hash are skipped, changed texts are re-encoded, and every batch is committed
durably before it is counted as written, so a killed run leaves a readable
store and a re-run completes it. With ``long_document`` ``"max"`` or
``"mean"`` a long document is stored as its windows (``windows.py``) under its
id, and ranking it by id scores every window.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from kalm_t5gemma2_vllm_plugin.errors import KaLMError, KaLMInputError
from kalm_t5gemma2_vllm_plugin.passage_key import passage_key
from kalm_t5gemma2_vllm_plugin.store.format import (
    PassageRecord,
    StoreIdentity,
    text_sha256,
)
from kalm_t5gemma2_vllm_plugin.validation import (
    check_positive_int,
    parse_chunk_size,
    parse_dtype,
    read_jsonl,
    unicode_problem,
)
from kalm_t5gemma2_vllm_plugin.windows import (
    DEFAULT_MAX_WINDOWS,
    DEFAULT_WINDOW_OVERLAP,
    Window,
    split_document,
)

__all__ = ["PassageEncoder", "encode_corpus", "is_current"]


class PassageEncoder:
    """The KaLM encoder plus Matryoshka pooling, alone (no decoder, no vLLM).

    The same Transformers modules, weight mapping and pooling function as the
    vLLM model's ``embed_multimodal``, so stored states score like text.
    """

    def __init__(
        self,
        model_path: str,
        *,
        chunk_size: int | None,
        document_max_length: int,
        dtype: str,
        device: str | None = None,
    ) -> None:
        import torch
        from transformers import AutoConfig, AutoTokenizer

        from kalm_t5gemma2_vllm_plugin.cpu_tuning import tune_cpu_allocator
        from kalm_t5gemma2_vllm_plugin.prompt import check_yes_no_tokens
        from kalm_t5gemma2_vllm_plugin.t5gemma2 import build_encoder

        tune_cpu_allocator()  # a batch job of large activations, like the engine
        self.chunk_size = parse_chunk_size(chunk_size, "chunk_size")
        self.document_max_length = check_positive_int(
            document_max_length, "document_max_length"
        )
        self.dtype = parse_dtype(dtype) or "float32"
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        check_yes_no_tokens(self.tokenizer)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(getattr(torch, self.dtype))  # as vLLM builds it
        try:
            self.encoder = build_encoder(AutoConfig.from_pretrained(model_path))
        finally:
            torch.set_default_dtype(previous)
        self._load(Path(model_path))
        # The serving engine's device: the GPU when there is one.
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.encoder.to(self.device).eval()

    def _load(self, root: Path) -> None:
        from safetensors import safe_open

        from kalm_t5gemma2_vllm_plugin.t5gemma2 import checkpoint_target

        params = dict(self.encoder.named_parameters())
        loaded = set()
        for path in sorted(root.glob("*.safetensors")):
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    target = checkpoint_target(
                        key,
                        encoder_prefix="",
                        embedding="embed_tokens",
                        decoder_prefix=None,
                    )
                    if target is not None:
                        params[target].data.copy_(f.get_tensor(key))
                        loaded.add(target)
        if missing := set(params) - loaded:
            raise KaLMError(
                f"The checkpoint lacks encoder weights: {sorted(missing)[:5]}"
            )

    def windows(
        self, text: str, long_document: str, overlap: int, max_windows: int
    ) -> list[Window]:
        """The windows a document is stored as: one (its head) under
        ``"truncate"``; spans in the document's own tokens."""
        from kalm_t5gemma2_vllm_plugin.engine.requests import DocumentCut
        from kalm_t5gemma2_vllm_plugin.prompt import DOCUMENT_PREFIX

        limit = self.document_max_length
        if long_document != "truncate":
            return split_document(
                self.tokenizer,
                text,
                limit=limit,
                overlap=overlap,
                max_windows=max_windows,
                cut=DocumentCut.for_tokenizer(self.tokenizer),
                field="text",
            )
        tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        prefix = len(
            self.tokenizer(DOCUMENT_PREFIX, add_special_tokens=False)["input_ids"]
        )
        return [Window(text, 0, min(tokens, limit - prefix))]

    def encode(self, texts: Sequence[str]) -> list[tuple[Any, int, bool, str]]:
        """``(pooled states, encoder tokens, truncated, passage key)`` per text,
        one batch."""
        import torch

        from kalm_t5gemma2_vllm_plugin.prompt import encode_document
        from kalm_t5gemma2_vllm_plugin.t5gemma2 import encode_passages

        encoded = [
            encode_document(self.tokenizer, t, self.document_max_length) for t in texts
        ]
        states = encode_passages(
            self.encoder,
            [torch.tensor(e.ids, device=self.device) for e in encoded],
            self.chunk_size,
        )
        return [
            (
                s.to("cpu", copy=True),
                len(e.ids),
                e.truncated,
                passage_key(e.ids, self.chunk_size),
            )
            for s, e in zip(states, encoded, strict=True)
        ]


def is_current(
    stored: tuple[str, int, bool] | None, text_hash: str, long_document: str
) -> bool:
    """Whether a stored document (``text_hashes()``'s entry) can be kept: the
    same text, stored the way ``long_document`` asks (whole, or as windows; a
    stored head that was cut is re-encoded as windows)."""
    if stored is None:
        return False
    stored_hash, windows, truncated = stored
    if long_document == "truncate":
        return stored_hash == text_hash and windows == 1
    return stored_hash == text_hash and not (windows == 1 and truncated)


def _read_input(
    path: Path, invalid: list[KaLMInputError] | None = None
) -> Iterator[tuple[int, str, str]]:
    """``(line, id, text)`` per row. A malformed row is an error naming its
    line: raised, or appended to ``invalid`` and left out when that is given."""
    with open(path, "rb") as f:
        for line_number, row in read_jsonl(f, str(path)):
            try:
                yield line_number, *_row(row, f"{path}:{line_number}")
            except KaLMInputError as exc:
                if invalid is None:
                    raise
                invalid.append(exc)


def _row(row: Any, where: str) -> tuple[str, str]:
    if isinstance(row, KaLMInputError):
        raise row
    if (
        not isinstance(row, dict)
        or not isinstance(row.get("id"), str)
        or not isinstance(row.get("text"), str)
    ):
        raise KaLMInputError(
            f"{where}: a row must be an object with string fields 'id' and 'text'"
        )
    for key in ("id", "text"):
        if (problem := unicode_problem(row[key])) is not None:
            raise KaLMInputError(f"{where}: field {key!r} {problem}", field=key)
    return row["id"], row["text"]


def encode_corpus(
    encoder: PassageEncoder,
    input_path: Path,
    store: str | os.PathLike[str],
    *,
    identity: StoreIdentity,
    batch_size: int,
    progress: bool = False,
    invalid: list[KaLMInputError] | None = None,
    long_document: str = "truncate",
    window_overlap: int = DEFAULT_WINDOW_OVERLAP,
    max_windows: int = DEFAULT_MAX_WINDOWS,
    storage_options: Mapping[str, str] | None = None,
) -> dict[str, int]:
    """Encode what the store lacks; returns counts (encoded, skipped, total,
    windows written). ``store`` is a directory or a Lance URI (``uri.py``;
    ``storage_options`` as ``open_writer``'s).

    The whole input is read before anything is encoded, so a malformed row
    stops the run before the store is touched, unless ``invalid`` is given:
    then malformed rows are collected there and left out. A stored document
    is skipped when its text is unchanged and it is stored the way
    ``long_document`` asks (whole, or as windows; a stored head that was cut
    is re-encoded as windows). A document with more than ``max_windows``
    windows stops the run, naming its line.
    """
    from tqdm import tqdm

    from kalm_t5gemma2_vllm_plugin.store.uri import open_writer

    # Pass 1: ids and text hashes only (the texts themselves stay on disk).
    first_line: dict[str, int] = {}
    hashes: dict[str, str] = {}
    for line_number, doc_id, text in _read_input(input_path, invalid):
        if doc_id in first_line:
            raise KaLMInputError(
                f"{input_path}:{line_number}: duplicate id {doc_id!r} (first on line "
                f"{first_line[doc_id]})",
                field="id",
            )
        first_line[doc_id] = line_number
        hashes[doc_id] = text_sha256(text)

    with open_writer(store, identity, storage_options=storage_options) as writer:
        stored = writer.text_hashes()

        todo = {
            i for i in hashes if not is_current(stored.get(i), hashes[i], long_document)
        }
        bar = tqdm(
            total=len(todo), unit=" passages", disable=not progress, file=sys.stderr
        )
        # (document id, window) per pending window; a document's windows are
        # committed together (the writer replaces a document whole).
        batch: list[tuple[str, int, Window]] = []
        written = 0

        def flush() -> None:
            nonlocal written
            results = encoder.encode([w.text for _, _, w in batch])
            counts: dict[str, int] = {}
            for doc_id, _, _ in batch:
                counts[doc_id] = counts.get(doc_id, 0) + 1
            writer.write(
                (
                    PassageRecord(
                        doc_id,
                        hashes[doc_id],
                        len(states),
                        tokens,
                        cut,
                        key,
                        window=index,
                        windows=counts[doc_id],
                        token_start=w.token_start,
                        token_end=w.token_end,
                    ),
                    states,
                )
                for (doc_id, index, w), (states, tokens, cut, key) in zip(
                    batch, results, strict=True
                )
            )
            written += len(batch)
            bar.update(len(counts))
            batch.clear()

        with contextlib.closing(bar):
            # The same rows as pass 1: those it reported are left out again.
            again = None if invalid is None else []
            for line_number, doc_id, text in _read_input(input_path, again):
                if doc_id not in todo:
                    continue
                try:
                    windows = encoder.windows(
                        text, long_document, window_overlap, max_windows
                    )
                except KaLMInputError as exc:
                    raise KaLMInputError(
                        f"{input_path}:{line_number}: {exc}", field="text"
                    ) from None
                if batch and len(batch) + len(windows) > batch_size:
                    flush()
                batch.extend((doc_id, k, w) for k, w in enumerate(windows))
            if batch:
                flush()
    return {
        "encoded": len(todo),
        "skipped": len(hashes) - len(todo),
        "total": len(hashes),
        "windows": written,
    }
