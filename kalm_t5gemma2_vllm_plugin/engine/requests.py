# SPDX-License-Identifier: Apache-2.0
"""What the vLLM paths (offline reranker, HTTP service) send to the engine.

One request per ``(query, document)`` pair: the KaLM decoder prompt ids plus
the passage as encoder ids. Tokenizing the passage here (instead of inside the
engine) tells the caller which documents were truncated and how many tokens
each request carries; the engine's processor keys its cache on the same ids.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kalm_t5gemma2_vllm_plugin.constants import (
    DEFAULT_SYSTEM_INSTRUCTION,
    PASSAGE_MODALITY,
)
from kalm_t5gemma2_vllm_plugin.errors import KaLMInputError, TooManyItemsError
from kalm_t5gemma2_vllm_plugin.mep import pooled_length
from kalm_t5gemma2_vllm_plugin.prompt import (
    DOCUMENT_PREFIX,
    TokenizerLike,
    decoder_prompt_ids,
    encode_document,
    format_decoder_prompt,
)
from kalm_t5gemma2_vllm_plugin.store.format import PassageRecord
from kalm_t5gemma2_vllm_plugin.store.uri import PassageReader
from kalm_t5gemma2_vllm_plugin.vllm_model.config import (
    CHUNK_FIELD,
    IDS_FIELD,
    KEY_FIELD,
    STATES_CHUNK_FIELD,
    STATES_FIELD,
    TOKENS_FIELD,
    EngineSettings,
)
from kalm_t5gemma2_vllm_plugin.windows import (
    CHARS_PER_TOKEN,
    WindowPlan,
    text_windows,
)

__all__ = ["DocumentId", "EnginePrompt", "PromptBuilder", "StoredWindow"]


class DocumentId(str):
    """A document given by its id in the passage store, not by its text.

    Example:
        >>> reranker.predict([("query", DocumentId("doc-17")), ("query", "raw text")])
    """

    __slots__ = ()


@dataclass(frozen=True)
class StoredWindow:
    """Window ``window`` of a document the passage store holds as windows
    (``kalm-vllm-encode --long-document max``); built by ``plan_windows``."""

    id: str
    window: int


#: How far past the wanted length a safe cut is looked for; text without one
#: in that window (no natural text) is tokenized in full.
_CUT_WINDOW = 1 << 16
#: Junctions remembered per tokenizer (each costs a substring search).
_JUNCTION_CACHE = 65536
# Joins the vocabulary for substring searches; must occur in no token.
_SEPARATOR = "\x00"


class DocumentCut:
    """Where a document may be cut before tokenizing without changing a single
    id of the head that is kept.

    A cut is safe between two characters that occur side by side in no token of
    the vocabulary and in no added token (the raw and the normalized pair are
    both checked). No token can then span it, so every segmentation has a
    boundary there: BPE never merges across it, Unigram's lattice has no edge
    over it and its best path up to it depends only on the text before it,
    and added tokens are matched the same way on both sides. Hence
    ``tokenize(text) == tokenize(text[:cut]) + tokenize(text[cut:])``.

    The argument needs a pipeline that keeps positions: a normalizer that only
    replaces one character by another (Gemma's ``" " -> "▁"``), at most a
    pre-tokenizer that splits at one literal character (Gemma's split at
    ``" "``: its pieces only add boundaries), byte fallback with all 256 byte
    tokens (unknown characters become their own bytes, never a fused
    ``<unk>``), a deterministic BPE without word suffixes or whole-word lookup,
    and added tokens that strip nothing. ``for_tokenizer`` returns ``None`` for
    anything else, and documents are tokenized in full.
    """

    def __init__(self, pieces: list[str], replace: dict[str, str]) -> None:
        self._joined = _SEPARATOR.join(pieces)
        self._replace = replace
        self._safe: dict[str, bool] = {}

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> DocumentCut | None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or not _splits_at_one_char(backend.pre_tokenizer):
            return None
        replace = _char_replacements(backend.normalizer)
        if replace is None or not _model_keeps_positions(backend.model):
            return None
        added = list(backend.get_added_tokens_decoder().values())
        if any(t.lstrip or t.rstrip or t.single_word for t in added):
            return None
        vocab = backend.get_vocab(with_added_tokens=True)
        if any(f"<0x{b:02X}>" not in vocab for b in range(256)):
            return None
        pieces = [*vocab, *(t.content for t in added)]
        if any(_SEPARATOR in p for p in pieces):
            return None
        return cls(pieces, replace)

    def find(self, text: str, start: int) -> int | None:
        """The first safe cut in ``text`` at or after ``start`` (0 < cut <
        len(text), within ``_CUT_WINDOW``), or ``None``."""
        start = max(start, 1)
        for cut in range(start, min(len(text), start + _CUT_WINDOW)):
            if self._is_safe(text[cut - 1 : cut + 1]):
                return cut
        return None

    def _is_safe(self, pair: str) -> bool:
        safe = self._safe.get(pair)
        if safe is None:
            normal = "".join(self._replace.get(c, c) for c in pair)
            safe = pair not in self._joined and normal not in self._joined
            if len(self._safe) >= _JUNCTION_CACHE:
                self._safe.clear()
            self._safe[pair] = safe
        return safe


def _char_replacements(normalizer: Any) -> dict[str, str] | None:
    """``{char: char}`` of a normalizer made only of one-character ``Replace``
    steps (``{}`` without one); ``None`` for any other normalizer."""
    if normalizer is None:
        return {}
    spec = json.loads(normalizer.__getstate__())
    steps = spec["normalizers"] if spec.get("type") == "Sequence" else [spec]
    replace: dict[str, str] = {}
    for step in steps:
        pattern = step.get("pattern", {}).get("String")
        content = step.get("content")
        if step.get("type") != "Replace" or pattern is None or content is None:
            return None
        if len(pattern) != 1 or len(content) != 1 or replace:
            return None  # one mapping only: chained replacements could compose
        replace[pattern] = content
    return replace


def _splits_at_one_char(pre_tokenizer: Any) -> bool:
    if pre_tokenizer is None:
        return True
    spec = json.loads(pre_tokenizer.__getstate__())
    pattern = spec.get("pattern", {}).get("String")
    return bool(
        spec.get("type") == "Split"
        and pattern is not None
        and len(pattern) == 1
        and not spec.get("invert")
    )


def _model_keeps_positions(model: Any) -> bool:
    kind = type(model).__name__
    if kind == "BPE":
        return bool(
            model.byte_fallback
            and not model.dropout
            and not model.ignore_merges
            and not model.end_of_word_suffix
            and not model.continuing_subword_prefix
        )
    if kind == "Unigram":
        return bool(json.loads(model.__getstate__()).get("byte_fallback"))
    return False


@dataclass(frozen=True)
class EnginePrompt:
    """One engine request and what the caller reports about it."""

    prompt: dict[str, Any]
    #: The document was cut to the document length limit.
    truncated: bool
    #: Decoder prompt tokens plus encoder tokens.
    num_tokens: int


class PromptBuilder:
    """Builds engine prompts with the engine's KaLM settings."""

    def __init__(
        self,
        tokenizer: TokenizerLike,
        settings: EngineSettings,
        *,
        max_model_len: int,
        system_instruction: str = DEFAULT_SYSTEM_INSTRUCTION,
    ) -> None:
        self.tokenizer = tokenizer
        self.settings = settings
        self.max_model_len = max_model_len
        self.system_instruction = system_instruction
        self._cut = DocumentCut.for_tokenizer(tokenizer)
        # The store's shard cache is not thread-safe; builds may run in threads.
        self._store_lock = threading.Lock()

    def prompt_tokens(self, instruction: str) -> int:
        """Decoder prompt tokens with this instruction and an empty query."""
        return len(
            self.tokenizer(
                format_decoder_prompt("", instruction, self.system_instruction),
                add_special_tokens=False,
            )["input_ids"]
        )

    def check_instruction(self, instruction: str, field: str = "instruction") -> None:
        """Refuse an instruction with which a full-length query and document
        would not fit ``max_model_len``."""
        template = self.prompt_tokens(instruction)
        settings = self.settings
        needed = (
            template
            + settings.query_max_length
            + pooled_length(settings.document_max_length, settings.pool_factor)
        )
        if needed > self.max_model_len:
            raise KaLMInputError(
                f"max_model_len={self.max_model_len} is too small for this "
                f"{field}: a full-length query and document need {needed} positions "
                f"({template} prompt + {settings.query_max_length} query + pooled "
                f"document); raise max_model_len or lower query_max_length/"
                f"document_max_length.",
                field=field,
            )

    def build(
        self,
        pairs: Sequence[tuple[str, str]],
        instruction: str,
        *,
        document_max_length: int | None = None,
        store: PassageReader | None = None,
        max_tokens: int | None = None,
        field: str = "pairs",
        chunk_size: int | None = None,
    ) -> list[EnginePrompt]:
        """Engine prompts for validated pairs, in order (one tokenization per query).

        A ``DocumentId`` (or ``StoredWindow``) document takes its precomputed
        states from ``store`` (``UnknownDocumentError`` naming unknown ids).
        ``document_max_length`` may only lower the engine's limit for text
        (per-request ``max_tokens_per_doc``); stored passages keep the length
        they were encoded with. ``max_tokens`` bounds the request's tokens
        (what usage reports), counted as they are made: ``TooManyItemsError``
        naming ``field`` and the limit stops the work at the pair that crosses
        it. ``chunk_size``: the request's pooling factor (checked by the
        caller; ``None``: the engine's), applied in the engine.
        """
        stored = self._stored(pairs, store)
        limit = self.document_limit(document_max_length)
        target = chunk_size or self.settings.pool_factor
        store_chunk = None if store is None else store.identity.encoder_chunk_size
        decoder: dict[str, list[int]] = {}
        prompts = []
        total = 0
        for index, (query, document) in enumerate(pairs):
            if query not in decoder:
                decoder[query] = decoder_prompt_ids(
                    self.tokenizer,
                    query,
                    query_max_length=self.settings.query_max_length,
                    instruction=instruction,
                    system_instruction=self.system_instruction,
                )
            if isinstance(document, DocumentId | StoredWindow):
                record, states = stored[_store_key(document)]
                item: Any = {
                    STATES_FIELD: states,
                    KEY_FIELD: record.passage_key,
                    TOKENS_FIELD: record.num_tokens,
                    STATES_CHUNK_FIELD: store_chunk or 1,
                    CHUNK_FIELD: target,
                }
                truncated, tokens = record.truncated, record.num_tokens
            elif self.settings.decoder_only:
                raise KaLMInputError(
                    "This engine runs decoder-only (no encoder loaded): give "
                    "documents as ids of the passage store, not as text.",
                    field="documents",
                )
            else:
                ids, truncated = self.encode_passage(document, limit)
                item = {IDS_FIELD: ids, CHUNK_FIELD: target}
                tokens = len(ids)
            total += len(decoder[query]) + tokens
            if max_tokens is not None and total > max_tokens:
                raise TooManyItemsError(
                    f"{field} need more than {max_tokens} tokens ({total} by "
                    f"{field}.{index}); this server accepts at most {max_tokens} "
                    f"tokens per request (max_request_tokens).",
                    field=field,
                )
            prompts.append(
                EnginePrompt(
                    prompt={
                        "prompt_token_ids": decoder[query],
                        "multi_modal_data": {PASSAGE_MODALITY: item},
                    },
                    truncated=truncated,
                    num_tokens=len(decoder[query]) + tokens,
                )
            )
        return prompts

    def encode_passage(self, document: str, limit: int) -> tuple[list[int], bool]:
        """``encode_document``'s ids and truncation flag, tokenizing a long
        document only up to a safe cut (``DocumentCut``) that yields ``limit``
        tokens: the same ids, without tokenizing megabytes to keep a thousand."""
        head = len(DOCUMENT_PREFIX)
        want = head + limit * CHARS_PER_TOKEN
        while self._cut is not None and want < head + len(document):
            cut = self._cut.find(document, want - head)
            if cut is None:
                break
            passage = encode_document(self.tokenizer, document[:cut], limit)
            if len(passage.ids) == limit:  # the rest adds tokens: it is truncated
                return passage.ids, True
            want = 2 * (head + cut)
        passage = encode_document(self.tokenizer, document, limit)
        return passage.ids, passage.truncated

    def document_limit(self, document_max_length: int | None = None) -> int:
        """Encoder tokens kept per text document: the engine's limit, or a
        request's lower one."""
        limit = self.settings.document_max_length
        return limit if document_max_length is None else min(limit, document_max_length)

    def refresh_store(self, store: PassageReader) -> bool:
        """``store.refresh()`` (a newer version), between reads of it."""
        with self._store_lock:
            return store.refresh()

    def plan_windows(
        self,
        pairs: Sequence[tuple[str, Any]],
        policy: str,
        *,
        overlap: int,
        max_windows: int,
        store: PassageReader | None,
        document_max_length: int | None = None,
        field: Callable[[int], str] = lambda index: f"documents.{index}",
    ) -> WindowPlan:
        """One pair per window (``windows.py``): a text document is split
        here, a stored one is expanded into the windows the store holds for
        it (one for a document stored whole). ``field(index)`` names a
        document with too many windows."""
        limit = self.document_limit(document_max_length)
        ids = list(dict.fromkeys(d for _, d in pairs if isinstance(d, DocumentId)))
        records = {}
        if ids:
            store = self._need_store(store)
            with self._store_lock:
                records = store.window_records(ids)

        def windows(index: int, document: Any) -> list[tuple[Any, tuple[int, int]]]:
            if isinstance(document, DocumentId):
                return [
                    (StoredWindow(r.id, r.window), (r.token_start, r.token_end))
                    for r in records[document]
                ]
            return text_windows(
                self.tokenizer,
                document,
                limit=limit,
                overlap=overlap,
                max_windows=max_windows,
                cut=self._cut,
                field=field(index),
            )

        return WindowPlan.build(pairs, policy, windows)

    def _stored(
        self, pairs: Sequence[tuple[str, Any]], store: PassageReader | None
    ) -> dict[Any, tuple[PassageRecord, Any]]:
        keys = list(
            dict.fromkeys(
                _store_key(d)
                for _, d in pairs
                if isinstance(d, DocumentId | StoredWindow)
            )
        )
        if not keys:
            return {}
        store = self._need_store(store)
        with self._store_lock:
            loaded = store.load_windows(keys)
        return dict(zip(keys, loaded, strict=True))

    @staticmethod
    def _need_store(store: PassageReader | None) -> PassageReader:
        if store is None:
            raise KaLMInputError(
                "Documents given by id need a passage store (passage_store=...).",
                field="document_ids",
            )
        return store


def _store_key(document: DocumentId | StoredWindow) -> tuple[str, int]:
    """``(id, window)``: a ``DocumentId`` is its document's first window."""
    if isinstance(document, StoredWindow):
        return document.id, document.window
    return str(document), 0
