# SPDX-License-Identifier: Apache-2.0
"""From margins to scores and ranked records; shared by every reranker."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Literal, NotRequired, TypedDict, overload

from .validation import check_documents, check_str, check_top_k

__all__ = [
    "MarginReranker",
    "RankResult",
    "ScoreWithMargin",
    "rank_results",
    "score_from_margin",
]


class ScoreWithMargin(TypedDict):
    score: float
    margin: float


class RankResult(TypedDict):
    corpus_id: int
    score: float
    margin: NotRequired[float]


def score_from_margin(margin: float) -> float:
    """P(yes) = sigmoid(margin) in double precision, stable for any finite margin.

    Double precision keeps very confident scores apart: in float32 every margin
    above ~17 rounds to exactly 1.0.
    """
    if margin >= 0:
        return 1.0 / (1.0 + math.exp(-margin))
    z = math.exp(margin)
    return z / (1.0 + z)


def rank_results(
    margins: Sequence[float], *, top_k: int | None, return_margin: bool
) -> list[RankResult]:
    """Records sorted by score, descending; ties keep input order (stable sort)."""
    order = sorted(range(len(margins)), key=lambda i: -margins[i])
    if top_k is not None:
        order = order[:top_k]
    results: list[RankResult] = []
    for i in order:
        record: RankResult = {"corpus_id": i, "score": score_from_margin(margins[i])}
        if return_margin:
            record["margin"] = float(margins[i])
        results.append(record)
    return results


class MarginReranker(ABC):
    """``predict`` and ``rank`` on top of one ``margins`` method.

    Every reranker of the package (the Transformers reference, the vLLM one)
    computes margins its own way and shares this contract, so validation,
    ordering and record shapes are the same everywhere. Extra keyword arguments
    (e.g. the reference's ``batch_size``) go to ``margins``.
    """

    @abstractmethod
    def margins(
        self,
        pairs: Sequence[Sequence[str]],
        *,
        instruction: str | None = None,
        **options: Any,
    ) -> list[float]:
        """``yes_logit - no_logit`` (float32) per pair, in input order."""

    @overload
    def predict(
        self,
        pairs: Sequence[Sequence[str]],
        *,
        instruction: str | None = ...,
        return_margin: Literal[False] = ...,
        **options: Any,
    ) -> list[float]: ...

    @overload
    def predict(
        self,
        pairs: Sequence[Sequence[str]],
        *,
        instruction: str | None = ...,
        return_margin: Literal[True],
        **options: Any,
    ) -> list[ScoreWithMargin]: ...

    def predict(
        self,
        pairs: Sequence[Sequence[str]],
        *,
        instruction: str | None = None,
        return_margin: bool = False,
        **options: Any,
    ) -> list[float] | list[ScoreWithMargin]:
        """P(yes) for each ``(query, document)`` pair, in input order.

        With ``return_margin=True`` each item is ``{"score", "margin"}`` where
        ``margin = yes_logit - no_logit`` and ``score = sigmoid(margin)``.
        """
        margins = self.margins(pairs, instruction=instruction, **options)
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
        **options: Any,
    ) -> list[RankResult]:
        """``[{"corpus_id", "score"[, "margin"]}]`` sorted by score; ties by index."""
        query = check_str(query, "query")
        documents = check_documents(documents)
        top_k = check_top_k(top_k)
        margins = self.margins(
            [(query, doc) for doc in documents], instruction=instruction, **options
        )
        return rank_results(margins, top_k=top_k, return_margin=return_margin)
