# SPDX-License-Identifier: Apache-2.0
"""``KaLMVLLMReranker``: KaLM-Reranker-V1 on vLLM, as an offline Python API."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .constants import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_DOCUMENT_MAX_LENGTH,
    DEFAULT_ENCODER_CHUNK_SIZE,
    DEFAULT_INSTRUCTION,
    DEFAULT_MAX_MODEL_LEN,
    DEFAULT_QUERY_MAX_LENGTH,
    DEFAULT_SYSTEM_INSTRUCTION,
    MODEL_ID,
)
from .engine import open_passage_store, prepare_engine
from .engine_prompts import DocumentId
from .errors import KaLMEngineError, KaLMInputError
from .hub import resolve_model
from .scores import MarginReranker, RankResult
from .settings import EngineSettings
from .store import PassageStore
from .validation import (
    check_documents,
    check_pairs,
    check_positive_int,
    check_str,
    parse_chunk_size,
)

__all__ = ["KaLMVLLMReranker"]


class KaLMVLLMReranker(MarginReranker):
    """KaLM-Reranker-V1 served by a vLLM engine that this object owns.

    Calls become ``LLM.classify()`` batches scheduled by vLLM; a passage seen
    before (in this call or an earlier one) is not encoded again while it stays
    in vLLM's encoder cache.

    Args:
        model: Hub id or local checkpoint directory.
        query_max_length: query tokens kept.
        document_max_length: document tokens kept, the ``"<Document>: "`` prefix
            included.
        encoder_chunk_size: Matryoshka pooling factor: 1, 2, 4, 8, 16 or 32
            (``None`` or ``"none"``: no pooling, the same as 1).
        dtype: engine dtype; bfloat16 on CUDA, float32 on CPU by default.
        max_model_len: longest request (pooled passage + decoder prompt).
        batch_size: most requests vLLM runs in one step (``max_num_seqs``).
        gpu_memory_utilization: vLLM's memory fraction on GPU.
        instruction: default task instruction.
        system_instruction: the fixed system sentence of the prompt.
        passage_store: a store written by ``kalm-vllm-encode`` with the same
            model and settings; documents may then be given by id.
        decoder_only: load no encoder at all (needs ``passage_store``): every
            document must come from the store, and no encoding happens online.
        **engine_args: passed to ``vllm.LLM``.

    Example:
        >>> with KaLMVLLMReranker("KaLM-Embedding/KaLM-Reranker-V1-Nano") as rr:
        ...     rr.rank("What is the capital of China?",
        ...             ["The capital of China is Beijing.", "Gravity attracts."])
        [{'corpus_id': 0, 'score': 0.9998...}, {'corpus_id': 1, 'score': 6.9e-07}]
    """

    def __init__(
        self,
        model: str = MODEL_ID,
        *,
        query_max_length: int = DEFAULT_QUERY_MAX_LENGTH,
        document_max_length: int = DEFAULT_DOCUMENT_MAX_LENGTH,
        encoder_chunk_size: int | str | None = DEFAULT_ENCODER_CHUNK_SIZE,
        dtype: str | None = None,
        max_model_len: int = DEFAULT_MAX_MODEL_LEN,
        batch_size: int = DEFAULT_BATCH_SIZE,
        gpu_memory_utilization: float | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
        system_instruction: str = DEFAULT_SYSTEM_INSTRUCTION,
        passage_store: str | os.PathLike[str] | None = None,
        decoder_only: bool = False,
        **engine_args: Any,
    ) -> None:
        self._llm: Any = None
        self.store: PassageStore | None = None
        if decoder_only and passage_store is None:
            raise KaLMInputError(
                "decoder_only=True needs a passage_store: without an encoder every "
                "document must come precomputed.",
                field="decoder_only",
            )
        self.settings = EngineSettings(
            chunk_size=parse_chunk_size(encoder_chunk_size, "encoder_chunk_size"),
            document_max_length=check_positive_int(
                document_max_length, "document_max_length"
            ),
            query_max_length=check_positive_int(query_max_length, "query_max_length"),
            allow_passage_states=passage_store is not None,
            decoder_only=decoder_only,
        )
        self.max_model_len = check_positive_int(max_model_len, "max_model_len")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        if gpu_memory_utilization is not None and not 0 < gpu_memory_utilization <= 1:
            raise KaLMInputError(
                "gpu_memory_utilization must be in (0, 1], got "
                f"{gpu_memory_utilization}.",
                field="gpu_memory_utilization",
            )
        self.instruction = check_str(instruction, "instruction")
        self.system_instruction = check_str(system_instruction, "system_instruction")

        self.model = str(model)
        self.model_path = resolve_model(model)
        if passage_store is not None:
            self.store = open_passage_store(
                passage_store, self.model_path, self.settings, dtype
            )
        setup = prepare_engine(
            self.model_path,
            self.settings,
            instruction=self.instruction,
            system_instruction=self.system_instruction,
            dtype=dtype,
            max_model_len=self.max_model_len,
            batch_size=self.batch_size,
            gpu_memory_utilization=gpu_memory_utilization,
            **engine_args,
        )
        self.tokenizer, self.prompts = setup.tokenizer, setup.prompts
        self._counters = setup.counters
        from vllm import LLM

        try:
            self._llm = LLM(**setup.engine_args)
        except BaseException:
            self._counters.unlink()
            raise
        self.dtype = str(self._llm.llm_engine.model_config.dtype).removeprefix("torch.")
        # Start-up (profiling, warm-up) runs dummy passages; count from here.
        self._counters_at_start = self._counters.snapshot()

    # --- context manager ----------------------------------------------------------
    def __enter__(self) -> KaLMVLLMReranker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Shut the engine down; idempotent."""
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            self._counters.unlink()
        if self.store is not None:
            self.store.close()

    # --- scoring ----------------------------------------------------------------
    def rank(  # type: ignore[override]
        self,
        query: str,
        documents: Sequence[str] = (),
        *,
        document_ids: Sequence[str] = (),
        instruction: str | None = None,
        top_k: int | None = None,
        return_margin: bool = False,
    ) -> list[RankResult]:
        """``[{"corpus_id", "score"[, "margin"]}]`` sorted by score; ties by index.

        Documents come as text (``documents``) and/or by id from the passage
        store (``document_ids``); ``corpus_id`` counts ``documents`` first, then
        ``document_ids``.
        """
        docs = check_documents(documents)
        ids = check_documents(document_ids, "document_ids")
        return super().rank(
            query,
            docs + [DocumentId(i) for i in ids],
            instruction=instruction,
            top_k=top_k,
            return_margin=return_margin,
        )

    def margins(
        self, pairs: Sequence[Sequence[str]], *, instruction: str | None = None
    ) -> list[float]:
        """``yes_logit - no_logit`` (float32) per pair, in input order."""
        checked = check_pairs(pairs)
        if instruction is None:
            instruction = self.instruction
        else:
            self.prompts.check_instruction(check_str(instruction, "instruction"))
        llm = self._engine()
        if not checked:
            return []
        built = self.prompts.build(checked, instruction, store=self.store)
        prompts = [p.prompt for p in built]
        from vllm import PoolingParams

        outputs = llm.classify(
            prompts, pooling_params=PoolingParams(use_activation=False), use_tqdm=False
        )
        return [_margin_of(output) for output in outputs]

    def stats(self) -> dict[str, int]:
        """Engine counters since start: passages encoded (and their tokens),
        passages received precomputed, requests scored."""
        self._engine()
        now = self._counters.snapshot()
        return {k: now[k] - self._counters_at_start[k] for k in now}

    # --- helpers ----------------------------------------------------------------
    def _engine(self) -> Any:
        if self._llm is None:
            raise RuntimeError("The reranker has been closed.")
        return self._llm


def _margin_of(output: Any) -> float:
    values = output.outputs.probs
    if len(values) != 1 or values[0] != values[0] or abs(values[0]) == float("inf"):
        raise KaLMEngineError(
            f"The engine returned {values!r} instead of one finite margin."
        )
    return float(values[0])
