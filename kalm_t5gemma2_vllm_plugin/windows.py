# SPDX-License-Identifier: Apache-2.0
"""Long documents as windows: how a document longer than the document limit
is split, and how its windows' margins become the document's.

A window is an ordinary passage (the ``"<Document>: "`` prefix plus a run of
the document's tokens, within the limit), so every cache and the store reuse
it like any other. Policies (``long_document``):

* ``"truncate"``: the head only (the model's own behaviour, the default);
* ``"max"``: the document scores as its best window;
* ``"mean"``: its margin is the mean of its windows' margins (the score stays
  ``sigmoid(margin)``).

Windows hold ``W = limit - prefix tokens`` of the document's own tokens and
overlap by ``min(window_overlap, W // 4)`` tokens; the last window ends at the
document's end. A window's text is the document's text from its first token's
first character to its last token's last character, so a window scores
exactly as that text does through any score path. Pure Python: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kalm_t5gemma2_vllm_plugin.errors import KaLMInputError, TooManyItemsError
from kalm_t5gemma2_vllm_plugin.prompt import DOCUMENT_PREFIX

__all__ = [
    "DEFAULT_MAX_WINDOWS",
    "DEFAULT_WINDOW_OVERLAP",
    "LONG_DOCUMENT_POLICIES",
    "Window",
    "WindowPlan",
    "WindowScore",
    "check_long_document",
    "check_window_overlap",
    "split_document",
    "text_windows",
    "window_spans",
]

LONG_DOCUMENT_POLICIES = ("truncate", "max", "mean")
#: Tokens shared by neighbouring windows (at most a quarter of a window).
DEFAULT_WINDOW_OVERLAP = 80
#: Windows one document may have; more is refused (HTTP 413).
DEFAULT_MAX_WINDOWS = 32
#: First guess of characters per token when tokenizing only a head of a
#: document (here and in ``requests.PromptBuilder.encode_passage``).
CHARS_PER_TOKEN = 8


def check_long_document(value: Any, field: str = "long_document") -> str:
    """A policy name; ``None`` is ``"truncate"``."""
    if value is None:
        return "truncate"
    if value not in LONG_DOCUMENT_POLICIES:
        raise KaLMInputError(
            f"{field} must be one of {list(LONG_DOCUMENT_POLICIES)}, got {value!r}.",
            field=field,
        )
    return str(value)


def check_window_overlap(value: Any, field: str = "window_overlap") -> int:
    """Overlap in tokens; ``None`` is the default (80)."""
    if value is None:
        return DEFAULT_WINDOW_OVERLAP
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise KaLMInputError(
            f"{field} must be an integer >= 0 (tokens), got {value!r}.", field=field
        )
    return value


def window_spans(num_tokens: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """``[token_start, token_end)`` of each window over ``num_tokens`` tokens:
    windows of ``size`` tokens, ``min(overlap, size // 4)`` shared with the
    next, the last one ending at the end (it may share more)."""
    if size < 1:
        raise ValueError(f"window size must be >= 1, got {size}")
    if num_tokens <= size:
        return [(0, num_tokens)]
    stride = size - min(overlap, size // 4)
    starts = [*range(0, num_tokens - size, stride), num_tokens - size]
    return [(start, start + size) for start in starts]


def max_tokens_for(windows: int, size: int, overlap: int) -> int:
    """The longest document (tokens) that has at most ``windows`` windows."""
    return size + (windows - 1) * (size - min(overlap, size // 4))


@dataclass(frozen=True)
class Window:
    """One window of a document: its text and its span in the document's tokens."""

    text: str
    token_start: int
    token_end: int


class SafeCut(Protocol):
    """``requests.DocumentCut``: where a text may be cut before tokenizing."""

    def find(self, text: str, start: int) -> int | None: ...


def split_document(
    tokenizer: Any,
    document: str,
    *,
    limit: int,
    overlap: int,
    max_windows: int,
    cut: SafeCut | None = None,
    field: str = "documents",
) -> list[Window]:
    """The windows of ``document`` for a document limit of ``limit`` tokens
    (prefix included). More than ``max_windows`` is a ``TooManyItemsError``
    naming ``field``; a document that fits is one window holding it unchanged.

    With ``cut``, a huge document is tokenized only as far as deciding needs.
    """
    prefix = len(tokenizer(DOCUMENT_PREFIX, add_special_tokens=False)["input_ids"])
    size = limit - prefix
    if size < 1:
        raise KaLMInputError(
            f"A document limit of {limit} tokens leaves no room for a window "
            f"after the {prefix}-token prefix.",
            field="max_tokens_per_doc",
        )
    most = max_tokens_for(max_windows, size, overlap)
    head = _head(tokenizer, document, most, cut)
    if head is None:
        raise _too_many(field, max_windows, most)
    offsets = tokenizer(
        document, add_special_tokens=False, return_offsets_mapping=True
    )["offset_mapping"]
    spans = window_spans(len(offsets), size, overlap)
    if len(spans) > max_windows:
        raise _too_many(field, max_windows, most)
    if len(spans) == 1:
        return [Window(document, 0, len(offsets))]
    return [
        Window(document[offsets[start][0] : offsets[end - 1][1]], start, end)
        for start, end in spans
    ]


def text_windows(
    tokenizer: Any,
    document: str,
    *,
    limit: int,
    overlap: int,
    max_windows: int,
    cut: SafeCut | None = None,
    field: str = "documents",
) -> list[tuple[str, tuple[int, int]]]:
    """``split_document`` as ``WindowPlan.build`` takes it: ``(text, span)``."""
    windows = split_document(
        tokenizer,
        document,
        limit=limit,
        overlap=overlap,
        max_windows=max_windows,
        cut=cut,
        field=field,
    )
    return [(w.text, (w.token_start, w.token_end)) for w in windows]


def _head(tokenizer: Any, document: str, most: int, cut: SafeCut | None) -> str | None:
    """``document`` if it has at most ``most`` tokens, else ``None``, deciding
    from ever longer heads cut where no token spans (so a 30 MB text is not
    tokenized to learn that it is too long)."""
    want = (most + 1) * CHARS_PER_TOKEN
    while cut is not None and want < len(document):
        at = cut.find(document, want)
        if at is None:
            break
        piece = tokenizer(document[:at], add_special_tokens=False)["input_ids"]
        if len(piece) > most:
            return None
        want = 2 * at
    return document


def _too_many(field: str, max_windows: int, most: int) -> TooManyItemsError:
    return TooManyItemsError(
        f"{field}: a document needs more than {max_windows} windows (more than "
        f"{most} tokens); this limit is max_windows_per_document.",
        field=field,
    )


@dataclass(frozen=True)
class WindowScore:
    """A document's margin under a policy, and which window scored best."""

    margin: float
    windows: int
    #: ``(token_start, token_end)`` of the best window in the document's tokens.
    best_window: tuple[int, int]


@dataclass
class WindowPlan:
    """Pairs expanded into one pair per window; ``combine`` folds them back."""

    policy: str
    pairs: list[tuple[str, Any]]
    #: Per original pair: the range of its windows in ``pairs``.
    groups: list[range]
    spans: list[tuple[int, int]]

    @classmethod
    def build(
        cls,
        pairs: Sequence[tuple[str, Any]],
        policy: str,
        windows: Callable[[int, Any], list[tuple[Any, tuple[int, int]]]],
    ) -> WindowPlan:
        """``windows(index, document)`` gives ``(window document, span)`` per
        window of the document at ``index``."""
        plan = cls(policy, [], [], [])
        for index, (query, document) in enumerate(pairs):
            start = len(plan.pairs)
            for window, span in windows(index, document):
                plan.pairs.append((query, window))
                plan.spans.append(span)
            plan.groups.append(range(start, len(plan.pairs)))
        return plan

    def combine(self, margins: Sequence[float]) -> list[WindowScore]:
        scores = []
        for group in self.groups:
            values = [margins[i] for i in group]
            best = max(range(len(values)), key=values.__getitem__)  # first on ties
            margin = (
                values[best]
                if self.policy == "max"
                else math.fsum(values) / len(values)
            )
            scores.append(
                WindowScore(float(margin), len(values), self.spans[group[best]])
            )
        return scores
