# SPDX-License-Identifier: Apache-2.0
"""The contract every reranker of the package honours: ``predict`` and ``rank``
on top of one ``margins`` method."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Literal, overload

from kalm_t5gemma2_vllm_plugin.scores import (
    RankResult,
    ScoreWithMargin,
    rank_results,
    score_from_margin,
)
from kalm_t5gemma2_vllm_plugin.validation import (
    check_documents,
    check_pairs,
    check_positive_int,
    check_str,
    check_top_k,
)
from kalm_t5gemma2_vllm_plugin.windows import (
    DEFAULT_MAX_WINDOWS,
    WindowPlan,
    check_long_document,
    check_window_overlap,
    text_windows,
)

__all__ = ["MarginReranker", "Pairs"]

#: Validated ``(query, document)`` pairs.
Pairs = list[tuple[str, str]]


class MarginReranker(ABC):
    """``predict`` and ``rank`` on top of one ``margins`` method.

    Every reranker of the package (the Transformers reference, the vLLM one)
    computes margins its own way and shares this contract, so validation,
    ordering, record shapes, long-document windows (``windows.py``) and the
    per-call ``encoder_chunk_size`` are the same everywhere.
    """

    #: The checkpoint's tokenizer (windows are cut in its tokens).
    tokenizer: Any

    def margins(
        self,
        pairs: Sequence[Sequence[str]],
        *,
        instruction: str | None = None,
        batch_size: int | None = None,
        encoder_chunk_size: int | None = None,
    ) -> list[float]:
        """``yes_logit - no_logit`` (float32) per pair, in input order.

        ``batch_size``: most pairs computed together in this call (``None``:
        the reranker's own default). ``encoder_chunk_size``: pool passages
        coarser than the reranker's default for this call.
        """
        return self._scored(
            pairs, instruction, batch_size, None, None, encoder_chunk_size
        )[0]

    def _scored(
        self,
        pairs: Sequence[Sequence[str]],
        instruction: str | None,
        batch_size: int | None,
        long_document: str | None,
        window_overlap: int | None,
        encoder_chunk_size: int | None,
        max_windows: int = DEFAULT_MAX_WINDOWS,
    ) -> tuple[list[float], list[tuple[int, tuple[int, int]]] | None]:
        """Margins per pair and, under a window policy, ``(windows, best
        span)`` per pair."""
        checked = check_pairs(pairs)
        if instruction is not None:
            instruction = check_str(instruction, "instruction")
        if batch_size is not None:
            batch_size = check_positive_int(batch_size, "batch_size")
        policy = check_long_document(long_document)
        overlap = check_window_overlap(window_overlap)
        chunk = self._request_chunk_size(encoder_chunk_size)
        max_windows = check_positive_int(max_windows, "max_windows_per_document")
        if policy == "truncate":
            return self._margins(checked, instruction, batch_size, chunk), None
        plan = self._plan(checked, policy, overlap, max_windows)
        scores = plan.combine(self._margins(plan.pairs, instruction, batch_size, chunk))
        return [s.margin for s in scores], [(s.windows, s.best_window) for s in scores]

    @abstractmethod
    def _margins(
        self,
        pairs: Pairs,
        instruction: str | None,
        batch_size: int | None,
        chunk_size: int | None,
    ) -> list[float]:
        """Margins of checked pairs; ``None``: the reranker's default."""

    @abstractmethod
    def _document_limit(self) -> int:
        """Document tokens kept (prefix included): a window's size."""

    @abstractmethod
    def _request_chunk_size(self, value: Any) -> int | None:
        """A call's pooling factor, checked; ``None``: the default."""

    def _plan(
        self, pairs: Pairs, policy: str, overlap: int, max_windows: int
    ) -> WindowPlan:
        """One pair per window of each (text) document."""
        limit = self._document_limit()

        def windows(index: int, document: str) -> list[tuple[str, tuple[int, int]]]:
            return text_windows(
                self.tokenizer,
                document,
                limit=limit,
                overlap=overlap,
                max_windows=max_windows,
                field=f"documents.{index}",
            )

        return WindowPlan.build(pairs, policy, windows)

    @overload
    def predict(
        self,
        pairs: Sequence[Sequence[str]],
        *,
        instruction: str | None = ...,
        return_margin: Literal[False] = ...,
        batch_size: int | None = None,
        long_document: str | None = None,
        window_overlap: int | None = None,
        encoder_chunk_size: int | None = None,
        max_windows_per_document: int = DEFAULT_MAX_WINDOWS,
    ) -> list[float]: ...

    @overload
    def predict(
        self,
        pairs: Sequence[Sequence[str]],
        *,
        instruction: str | None = ...,
        return_margin: Literal[True],
        batch_size: int | None = None,
        long_document: str | None = None,
        window_overlap: int | None = None,
        encoder_chunk_size: int | None = None,
        max_windows_per_document: int = DEFAULT_MAX_WINDOWS,
    ) -> list[ScoreWithMargin]: ...

    def predict(
        self,
        pairs: Sequence[Sequence[str]],
        *,
        instruction: str | None = None,
        return_margin: bool = False,
        batch_size: int | None = None,
        long_document: str | None = None,
        window_overlap: int | None = None,
        encoder_chunk_size: int | None = None,
        max_windows_per_document: int = DEFAULT_MAX_WINDOWS,
    ) -> list[float] | list[ScoreWithMargin]:
        """P(yes) for each ``(query, document)`` pair, in input order.

        With ``return_margin=True`` each item is ``{"score", "margin"}`` where
        ``margin = yes_logit - no_logit`` and ``score = sigmoid(margin)``, plus
        ``windows`` and ``best_window`` under a long-document policy.

        ``long_document``: ``"truncate"`` (default), ``"max"`` or ``"mean"``
        (``windows.py``); ``window_overlap``: tokens shared by neighbouring
        windows (default 80, at most a quarter of a window);
        ``encoder_chunk_size``: a coarser pooling factor for this call;
        ``max_windows_per_document``: more windows is an error naming the
        document.
        """
        margins, windows = self._scored(
            pairs,
            instruction,
            batch_size,
            long_document,
            window_overlap,
            encoder_chunk_size,
            max_windows_per_document,
        )
        if not return_margin:
            return [score_from_margin(m) for m in margins]
        items: list[ScoreWithMargin] = []
        for i, m in enumerate(margins):
            item: ScoreWithMargin = {"score": score_from_margin(m), "margin": m}
            if windows is not None:
                count, (start, end) = windows[i]
                item["windows"] = count
                item["best_window"] = {"token_start": start, "token_end": end}
            items.append(item)
        return items

    def rank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        instruction: str | None = None,
        top_k: int | None = None,
        return_margin: bool = False,
        batch_size: int | None = None,
        long_document: str | None = None,
        window_overlap: int | None = None,
        encoder_chunk_size: int | None = None,
        max_windows_per_document: int = DEFAULT_MAX_WINDOWS,
    ) -> list[RankResult]:
        """``[{"corpus_id", "score"[, "margin"]}]`` sorted by score; ties by index.

        Under a long-document policy each record also has ``windows`` and
        ``best_window`` (``predict`` explains the keywords).
        """
        query = check_str(query, "query")
        documents = check_documents(documents)
        top_k = check_top_k(top_k)
        margins, windows = self._scored(
            [(query, doc) for doc in documents],
            instruction,
            batch_size,
            long_document,
            window_overlap,
            encoder_chunk_size,
            max_windows_per_document,
        )
        return rank_results(
            margins, top_k=top_k, return_margin=return_margin, windows=windows
        )
