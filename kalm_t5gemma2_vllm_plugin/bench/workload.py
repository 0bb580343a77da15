# SPDX-License-Identifier: Apache-2.0
"""The benchmark's texts: deterministic, exact token lengths, shared by every engine."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import synthetic_text
from kalm_t5gemma2_vllm_plugin.constants import (
    DEFAULT_INSTRUCTION,
    DEFAULT_SYSTEM_INSTRUCTION,
)

__all__ = ["Workload", "qwen3_reranker_prompt"]


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
