# SPDX-License-Identifier: Apache-2.0
"""The contract every reranker of the package honours: ``predict`` and ``rank``
on top of one ``margins`` method."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal, overload

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

__all__ = ["MarginReranker", "Pairs"]

#: Validated ``(query, document)`` pairs.
Pairs = list[tuple[str, str]]


class MarginReranker(ABC):
    """``predict`` and ``rank`` on top of one ``margins`` method.

    Every reranker of the package (the Transformers reference, the vLLM one)
    computes margins its own way and shares this contract, so validation,
    ordering and record shapes are the same everywhere.
    """

    def margins(
        self,
        pairs: Sequence[Sequence[str]],
        *,
        instruction: str | None = None,
        batch_size: int | None = None,
    ) -> list[float]:
        """``yes_logit - no_logit`` (float32) per pair, in input order.

        ``batch_size``: most pairs computed together in this call (``None``:
        the reranker's own default).
        """
        checked = check_pairs(pairs)
        if instruction is not None:
            instruction = check_str(instruction, "instruction")
        if batch_size is not None:
            batch_size = check_positive_int(batch_size, "batch_size")
        return self._margins(checked, instruction, batch_size)

    @abstractmethod
    def _margins(
        self, pairs: Pairs, instruction: str | None, batch_size: int | None
    ) -> list[float]:
        """Margins of checked pairs; ``None``: the reranker's default."""

    @overload
    def predict(
        self,
        pairs: Sequence[Sequence[str]],
        *,
        instruction: str | None = ...,
        return_margin: Literal[False] = ...,
        batch_size: int | None = None,
    ) -> list[float]: ...

    @overload
    def predict(
        self,
        pairs: Sequence[Sequence[str]],
        *,
        instruction: str | None = ...,
        return_margin: Literal[True],
        batch_size: int | None = None,
    ) -> list[ScoreWithMargin]: ...

    def predict(
        self,
        pairs: Sequence[Sequence[str]],
        *,
        instruction: str | None = None,
        return_margin: bool = False,
        batch_size: int | None = None,
    ) -> list[float] | list[ScoreWithMargin]:
        """P(yes) for each ``(query, document)`` pair, in input order.

        With ``return_margin=True`` each item is ``{"score", "margin"}`` where
        ``margin = yes_logit - no_logit`` and ``score = sigmoid(margin)``.
        """
        margins = self.margins(pairs, instruction=instruction, batch_size=batch_size)
        if return_margin:
            return [{"score": score_from_margin(m), "margin": m} for m in margins]
        return [score_from_margin(m) for m in margins]

    def rank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        instruction: str | None = None,
        top_k: int | None = None,
        return_margin: bool = False,
        batch_size: int | None = None,
    ) -> list[RankResult]:
        """``[{"corpus_id", "score"[, "margin"]}]`` sorted by score; ties by index."""
        query = check_str(query, "query")
        documents = check_documents(documents)
        top_k = check_top_k(top_k)
        margins = self.margins(
            [(query, doc) for doc in documents],
            instruction=instruction,
            batch_size=batch_size,
        )
        return rank_results(margins, top_k=top_k, return_margin=return_margin)
