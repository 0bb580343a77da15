# SPDX-License-Identifier: Apache-2.0
"""The model card's plain-Transformers KaLM reranker: the fidelity oracle.

``KaLMReranker`` keeps the model card's class name (and argument names) so the
card's code runs unchanged; the product is ``KaLMVLLMReranker``.

Deliberately plain: the whole ``T5Gemma2ForConditionalGeneration`` (vision
tower included), the full LM head, one batch at a time. Every faster path in
this package is tested against it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoTokenizer, T5Gemma2ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput

from kalm_t5gemma2_vllm_plugin.checkpoints.hub import resolve_model
from kalm_t5gemma2_vllm_plugin.constants import (
    DECODER_PAD_TO_MULTIPLE_OF,
    DEFAULT_BATCH_SIZE,
    DEFAULT_DOCUMENT_MAX_LENGTH,
    DEFAULT_ENCODER_CHUNK_SIZE,
    DEFAULT_INSTRUCTION,
    DEFAULT_QUERY_MAX_LENGTH,
    DEFAULT_SYSTEM_INSTRUCTION,
    MODEL_ID,
)
from kalm_t5gemma2_vllm_plugin.errors import KaLMEngineError
from kalm_t5gemma2_vllm_plugin.mep import mep_pool
from kalm_t5gemma2_vllm_plugin.prompt import (
    check_yes_no_tokens,
    decoder_prompt_ids,
    encode_document,
)
from kalm_t5gemma2_vllm_plugin.rerankers.base import MarginReranker, Pairs
from kalm_t5gemma2_vllm_plugin.validation import (
    check_positive_int,
    check_request_chunk_size,
    check_str,
    parse_chunk_size,
    parse_dtype,
)

__all__ = ["KaLMReranker"]


def _torch_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` gives bf16 on CUDA and fp32 elsewhere: pass ``dtype="float32"``
    wherever this reranker is the fidelity oracle."""
    name = parse_dtype(dtype)
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)  # type: ignore[no-any-return]


class KaLMReranker(MarginReranker):
    """KaLM-Reranker-V1 on plain Transformers, as on the model card.

    Args:
        model_name_or_path: Hub id or local checkpoint directory.
        device: torch device; CUDA when available, else CPU.
        dtype: bf16 on CUDA, fp32 on CPU by default.
        batch_size: pairs per forward pass.
        query_max_length: query tokens kept (the query alone is cut, then decoded).
        max_length: document tokens kept, the ``"<Document>: "`` prefix included.
        chunk_size: Matryoshka pooling factor (1, 2, 4, 8, 16, 32) or ``None``.
        instruction: task instruction placed in the decoder prompt.
        system_instruction: the fixed system sentence of the prompt.
        **model_kwargs: passed to ``from_pretrained``.

    Example:
        >>> reranker = KaLMReranker("KaLM-Embedding/KaLM-Reranker-V1-Nano")
        >>> reranker.rank("What is the capital of China?",
        ...               ["The capital of China is Beijing.", "Gravity attracts."])
        [{'corpus_id': 0, 'score': 0.9998...}, {'corpus_id': 1, 'score': 6.9e-07}]
    """

    def __init__(
        self,
        model_name_or_path: str = MODEL_ID,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        query_max_length: int = DEFAULT_QUERY_MAX_LENGTH,
        max_length: int = DEFAULT_DOCUMENT_MAX_LENGTH,
        chunk_size: int | str | None = DEFAULT_ENCODER_CHUNK_SIZE,
        instruction: str = DEFAULT_INSTRUCTION,
        system_instruction: str = DEFAULT_SYSTEM_INSTRUCTION,
        **model_kwargs: Any,
    ) -> None:
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.query_max_length = check_positive_int(query_max_length, "query_max_length")
        self.max_length = check_positive_int(max_length, "max_length")
        self.chunk_size = parse_chunk_size(chunk_size, "chunk_size")
        self.instruction = check_str(instruction, "instruction")
        self.system_instruction = check_str(system_instruction, "system_instruction")
        self.device = torch.device(
            device or ("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.dtype = _torch_dtype(dtype, self.device)

        path = resolve_model(model_name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "right"  # the last-token index below relies on it
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.yes_token_id, self.no_token_id = check_yes_no_tokens(self.tokenizer)

        # Built in the target dtype, buffers included: loading a bf16 checkpoint
        # first and casting only the parameters would leave the embedding scale
        # sqrt(hidden) rounded to bf16 in a float32 model.
        model_kwargs.setdefault("dtype", self.dtype)
        model = T5Gemma2ForConditionalGeneration.from_pretrained(path, **model_kwargs)
        self.model = model.to(self.device).eval()

    def _document_limit(self) -> int:
        return self.max_length

    def _request_chunk_size(self, value: Any) -> int | None:
        # Pooling runs per call here: any trained factor, finer ones too.
        return None if value is None else check_request_chunk_size(value, 1)

    def _margins(
        self,
        pairs: Pairs,
        instruction: str | None,
        batch_size: int | None,
        chunk_size: int | None,
    ) -> list[float]:
        instruction = self.instruction if instruction is None else instruction
        chunk = self.chunk_size if chunk_size is None else chunk_size
        batch_size = batch_size or self.batch_size
        # Batch similar lengths together (as the original does), restore order after.
        order = sorted(range(len(pairs)), key=lambda i: -sum(map(len, pairs[i])))
        margins = [0.0] * len(pairs)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            values = self._batch_margins([pairs[i] for i in batch], instruction, chunk)
            for i, value in zip(batch, values, strict=True):
                margins[i] = value
        return margins

    @torch.inference_mode()
    def _batch_margins(
        self, pairs: list[tuple[str, str]], instruction: str, chunk_size: int | None
    ) -> list[float]:
        tok = self.tokenizer
        encoder_ids = [
            encode_document(tok, doc, self.max_length).ids for _, doc in pairs
        ]
        decoder_ids = [
            decoder_prompt_ids(
                tok,
                query,
                query_max_length=self.query_max_length,
                instruction=instruction,
                system_instruction=self.system_instruction,
            )
            for query, _ in pairs
        ]
        enc = tok.pad({"input_ids": encoder_ids}, padding=True, return_tensors="pt")
        dec = tok.pad(
            {"input_ids": decoder_ids},
            padding=True,
            pad_to_multiple_of=DECODER_PAD_TO_MULTIPLE_OF,
            return_tensors="pt",
        )
        enc, dec = enc.to(self.device), dec.to(self.device)

        hidden = self.model.get_encoder()(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
        ).last_hidden_state  # [B, L, d]
        pooled, pooled_mask = mep_pool(hidden, enc["attention_mask"], chunk_size)
        logits = self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=pooled),
            attention_mask=pooled_mask,
            decoder_input_ids=dec["input_ids"],
            decoder_attention_mask=dec["attention_mask"],
        ).logits  # [B, T, V]
        last = dec["attention_mask"].sum(1) - 1  # right padding: last real token
        rows = logits[torch.arange(len(pairs), device=self.device), last]
        yes_no = rows[:, [self.yes_token_id, self.no_token_id]].float()
        margins = yes_no[:, 0] - yes_no[:, 1]
        if not torch.isfinite(yes_no).all():
            raise KaLMEngineError(
                f"Non-finite yes/no logits in dtype {self.dtype}; use bfloat16 or "
                f"float32 (float16 overflows in this model)."
            )
        return margins.tolist()
