# SPDX-License-Identifier: Apache-2.0
"""The benchmark's texts: deterministic, exact token lengths, shared by every engine."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import synthetic_text
from kalm_t5gemma2_vllm_plugin.constants import (
    DEFAULT_INSTRUCTION,
    DEFAULT_SYSTEM_INSTRUCTION,
)

__all__ = ["SharedPool", "Workload", "qwen3_reranker_prompt"]


@dataclass(frozen=True)
class Workload:
    """Q queries, each ranked over D documents of ``doc_tokens`` tokens."""

    queries: int
    documents: int
    doc_tokens: int
    query_tokens: int
    repeats: int
    seed: int = 0

    def query(self, repeat: int, index: int) -> str:
        """A fresh query per repeat and index (repeat -1: warm-up)."""
        return synthetic_text(self.query_tokens, seed=self._seed(1, repeat, index))

    def document_set(self, set_id: int) -> list[str]:
        """D documents; different ``set_id`` give documents never seen before."""
        return [
            synthetic_text(self.doc_tokens, seed=self._seed(2, set_id, i))
            for i in range(self.documents)
        ]

    def cold_set(self, repeat: int, index: int) -> list[str]:
        """New documents for every rank call of every repeat."""
        return self.document_set(1 + repeat * self.queries + index)

    @property
    def pairs_per_repeat(self) -> int:
        return self.queries * self.documents

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def _seed(self, kind: int, a: int, b: int) -> int:
        return (self.seed * 7919 + kind) * 1_000_003 + (a + 2) * 10_007 + b


def qwen3_reranker_prompt(
    query: str, document: str, instruction: str = DEFAULT_INSTRUCTION
) -> str:
    """Qwen3-Reranker's prompt (its model card), for the cross-encoder peer."""
    return (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_INSTRUCTION}<|im_end|>\n<|im_start|>user\n"
        f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
        "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


@dataclass(frozen=True)
class SharedPool:
    """Q queries, each ranking D distinct candidates drawn from one pool of P
    passages by Zipf popularity (passage ``i`` has weight ``1 / (i + 1) ** zipf``),
    as a retriever's top-D over a corpus with popular passages would.

    Passage texts depend only on ``(seed, doc_tokens, index)``, so every engine
    and every D see the same pool.
    """

    queries: int
    documents: int
    pool: int
    doc_tokens: int
    query_tokens: int = 8
    zipf: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.documents <= self.pool:
            raise ValueError(f"documents must be in [1, pool={self.pool}]")

    def passage(self, index: int) -> str:
        return synthetic_text(self.doc_tokens, seed=self._seed(3, index))

    @staticmethod
    def passage_id(index: int) -> str:
        return f"p{index}"

    def query(self, round_: int, index: int) -> str:
        """A fresh query text per round and index (round -1: warm-up)."""
        return synthetic_text(self.query_tokens, seed=self._seed(1, round_ + 2, index))

    def candidates(self, index: int) -> list[int]:
        """Query ``index``'s D pool indices: weighted sampling without replacement
        (each passage keyed by ``u ** (1 / weight)``, the D largest keys win)."""
        rng = random.Random(self._seed(4, index, self.documents))
        keys = [rng.random() ** ((i + 1) ** self.zipf) for i in range(self.pool)]
        return sorted(range(self.pool), key=keys.__getitem__, reverse=True)[
            : self.documents
        ]

    def hit_ceiling(self, queries: int | None = None) -> float:
        """The best hit rate any cache can reach on the first ``queries`` queries:
        every passage's first appearance must be encoded."""
        count = self.queries if queries is None else queries
        drawn = [i for q in range(count) for i in self.candidates(q)]
        return 1 - len(set(drawn)) / len(drawn)

    def subset(self, pairs: int) -> list[tuple[int, list[int]]]:
        """The first ``pairs`` pairs in query order, as (query index, candidates)
        calls shaped like the workload (the slow peers score only these)."""
        calls, left = [], pairs
        for q in range(self.queries):
            if left <= 0:
                break
            calls.append((q, self.candidates(q)[:left]))
            left -= self.documents
        return calls

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def _seed(self, kind: int, a: int, b: int = 0) -> int:
        return (self.seed * 7919 + kind) * 1_000_003 + (a + 2) * 10_007 + b
