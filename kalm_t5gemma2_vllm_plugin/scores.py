# SPDX-License-Identifier: Apache-2.0
"""From margins to scores and ranked records; shared by every score path."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NotRequired, TypedDict

__all__ = [
    "BestWindow",
    "RankResult",
    "ScoreWithMargin",
    "rank_results",
    "score_from_margin",
]


class BestWindow(TypedDict):
    """Offsets of a document's best window in the document's own tokens."""

    token_start: int
    token_end: int


class ScoreWithMargin(TypedDict):
    score: float
    margin: float
    windows: NotRequired[int]
    best_window: NotRequired[BestWindow]


class RankResult(TypedDict):
    corpus_id: int
    score: float
    margin: NotRequired[float]
    #: With a long-document policy: windows scored and the best one.
    windows: NotRequired[int]
    best_window: NotRequired[BestWindow]


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
    margins: Sequence[float],
    *,
    top_k: int | None,
    return_margin: bool,
    windows: Sequence[tuple[int, tuple[int, int]]] | None = None,
) -> list[RankResult]:
    """Records sorted by score, descending; ties keep input order (stable sort).

    ``windows``: per document, ``(windows scored, best window span)``, given
    under a long-document policy and then reported in every record.
    """
    order = sorted(range(len(margins)), key=lambda i: -margins[i])
    if top_k is not None:
        order = order[:top_k]
    results: list[RankResult] = []
    for i in order:
        record: RankResult = {"corpus_id": i, "score": score_from_margin(margins[i])}
        if return_margin:
            record["margin"] = float(margins[i])
        if windows is not None:
            count, (start, end) = windows[i]
            record["windows"] = count
            record["best_window"] = {"token_start": start, "token_end": end}
        results.append(record)
    return results
