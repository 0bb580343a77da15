# SPDX-License-Identifier: Apache-2.0
"""``KaLMVLLMReranker``: KaLM-Reranker-V1 on vLLM, as an offline Python API."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from kalm_t5gemma2_vllm_plugin.checkpoints.hub import resolve_model
from kalm_t5gemma2_vllm_plugin.constants import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_DOCUMENT_MAX_LENGTH,
    DEFAULT_ENCODER_CHUNK_SIZE,
    DEFAULT_INSTRUCTION,
    DEFAULT_PASSAGE_CACHE_MB,
    DEFAULT_QUERY_MAX_LENGTH,
    DEFAULT_STORE_REFRESH_S,
    DEFAULT_SYSTEM_INSTRUCTION,
    MODEL_ID,
)
from kalm_t5gemma2_vllm_plugin.engine.requests import DocumentId
from kalm_t5gemma2_vllm_plugin.engine.session import EngineOptions, EngineSession
from kalm_t5gemma2_vllm_plugin.engine.vllm_compat import (
    margin_from_classify,
    shutdown_llm,
)
from kalm_t5gemma2_vllm_plugin.rerankers.base import MarginReranker, Pairs
from kalm_t5gemma2_vllm_plugin.scores import RankResult
from kalm_t5gemma2_vllm_plugin.store.uri import PassageReader
from kalm_t5gemma2_vllm_plugin.validation import (
    check_documents,
    check_request_chunk_size,
)
from kalm_t5gemma2_vllm_plugin.vllm_model.config import EngineSettings
from kalm_t5gemma2_vllm_plugin.windows import DEFAULT_MAX_WINDOWS, WindowPlan

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
        max_model_len: longest request (pooled passage + decoder prompt);
            default: a full-length query and document, plus room for a longer
            instruction (``engine_sizes``).
        batch_size: most requests vLLM runs in one step (``max_num_seqs``).
        max_num_batched_tokens: vLLM's token budget per step; default: at
            least ``max_model_len`` and ``batch_size`` full-length requests, up
            to a ceiling per device. A value below ``max_model_len`` is refused.
        gpu_memory_utilization: vLLM's memory fraction on GPU.
        instruction: default task instruction.
        system_instruction: the fixed system sentence of the prompt.
        passage_store: a store written by ``kalm-vllm-encode`` with the same
            model and settings (a directory, or a Lance store: a ``.lance``
            path or an ``s3://`` URI); documents may then be given by id.
        store_options: Lance storage options (``aws_endpoint``, keys, ...),
            over those from the ``AWS_*`` environment variables.
        store_refresh_s: a Lance store's newest version is picked up at most
            this many seconds after it is committed (checked before a call).
        decoder_only: load no encoder at all (needs ``passage_store``): every
            document must come from the store, and no encoding happens online.
        passage_cache_mb: size of the plugin's passage cache in the engine
            (pooled states by passage, least recently used out); ``0`` turns
            it off. The default holds the candidates of many top-100 queries.
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
        max_model_len: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_num_batched_tokens: int | None = None,
        gpu_memory_utilization: float | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
        system_instruction: str = DEFAULT_SYSTEM_INSTRUCTION,
        passage_store: str | os.PathLike[str] | None = None,
        decoder_only: bool = False,
        passage_cache_mb: float = DEFAULT_PASSAGE_CACHE_MB,
        store_options: Mapping[str, str] | None = None,
        store_refresh_s: float = DEFAULT_STORE_REFRESH_S,
        **engine_args: Any,
    ) -> None:
        self._session: EngineSession | None = None
        settings = EngineSettings(
            chunk_size=encoder_chunk_size,
            document_max_length=document_max_length,
            query_max_length=query_max_length,
            decoder_only=decoder_only,
            passage_cache_mb=passage_cache_mb,
        )
        options = EngineOptions(
            model=str(model),
            model_path="",  # resolved below, once the arguments are known good
            settings=settings,
            dtype=dtype,
            max_model_len=max_model_len,
            batch_size=batch_size,
            max_num_batched_tokens=max_num_batched_tokens,
            gpu_memory_utilization=gpu_memory_utilization,
            instruction=instruction,
            system_instruction=system_instruction,
            passage_store=None if passage_store is None else os.fspath(passage_store),
            store_options=dict(store_options or {}),
            store_refresh_s=store_refresh_s,
            engine_args=engine_args,
        )
        options = dataclasses.replace(options, model_path=resolve_model(model))
        from vllm import LLM

        session = EngineSession(options)
        session.start(lambda args: LLM(**args), shutdown_llm)
        self._session = session
        self.options, self.settings = options, session.settings
        self.model, self.model_path = options.model, options.model_path
        self.sizes = session.sizes
        self.max_model_len = self.sizes.max_model_len
        self.batch_size = options.batch_size
        self.instruction = options.instruction
        self.tokenizer = session.tokenizer
        self.dtype = session.dtype

    # --- context manager ----------------------------------------------------------
    def __enter__(self) -> KaLMVLLMReranker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Shut the engine down; idempotent."""
        if self._session is not None:
            self._session.close()

    @property
    def llm(self) -> Any:
        """The ``vllm.LLM`` this reranker owns (read-only)."""
        return self._open().engine

    @property
    def store(self) -> PassageReader | None:
        """The passage store documents given by id come from, if any."""
        return None if self._session is None else self._session.store

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
        batch_size: int | None = None,
        long_document: str | None = None,
        window_overlap: int | None = None,
        encoder_chunk_size: int | None = None,
        max_windows_per_document: int = DEFAULT_MAX_WINDOWS,
    ) -> list[RankResult]:
        """``[{"corpus_id", "score"[, "margin"]}]`` sorted by score; ties by index.

        Documents come as text (``documents``) and/or by id from the passage
        store (``document_ids``); ``corpus_id`` counts ``documents`` first, then
        ``document_ids``. ``long_document``, ``window_overlap`` and
        ``encoder_chunk_size``: see ``predict``; a document given by id has
        the windows ``kalm-vllm-encode`` stored for it.
        """
        docs = check_documents(documents)
        ids = check_documents(document_ids, "document_ids")
        return super().rank(
            query,
            docs + [DocumentId(i) for i in ids],
            instruction=instruction,
            top_k=top_k,
            return_margin=return_margin,
            batch_size=batch_size,
            long_document=long_document,
            window_overlap=window_overlap,
            encoder_chunk_size=encoder_chunk_size,
            max_windows_per_document=max_windows_per_document,
        )

    def _document_limit(self) -> int:
        return self._open().settings.document_max_length

    def _request_chunk_size(self, value: Any) -> int | None:
        if value is None:
            return None
        return check_request_chunk_size(value, self._open().settings.chunk_size)

    def _plan(
        self, pairs: Pairs, policy: str, overlap: int, max_windows: int
    ) -> WindowPlan:
        session = self._open()
        return session.requests.plan_windows(
            pairs,
            policy,
            overlap=overlap,
            max_windows=max_windows,
            store=session.store,
        )

    def _margins(
        self,
        pairs: Pairs,
        instruction: str | None,
        batch_size: int | None,
        chunk_size: int | None,
    ) -> list[float]:
        # batch_size bounds the pairs submitted per LLM.classify call (default:
        # all at once; vLLM's scheduler batches within a call either way).
        session = self._open()
        per_call = batch_size or len(pairs) or 1
        instruction = session.instruction(instruction)
        from vllm import PoolingParams

        params = PoolingParams(use_activation=False)
        margins: list[float] = []
        for start in range(0, len(pairs), per_call):
            built = session.build(
                pairs[start : start + per_call], instruction, chunk_size=chunk_size
            )
            outputs = session.engine.classify(
                [p.prompt for p in built], pooling_params=params, use_tqdm=False
            )
            margins.extend(margin_from_classify(output) for output in outputs)
        return margins

    def stats(self) -> dict[str, int]:
        """Engine counters since start: passages encoded (and their tokens),
        passages received precomputed, requests scored."""
        return self._open().stats()

    # --- helpers ----------------------------------------------------------------
    def _open(self) -> EngineSession:
        if self._session is None or self._session.engine is None:
            raise RuntimeError("The reranker has been closed.")
        return self._session
