# SPDX-License-Identifier: Apache-2.0
"""What the vLLM paths (offline reranker, HTTP service) send to the engine.

One request per ``(query, document)`` pair: the KaLM decoder prompt ids plus
the passage as encoder ids. Tokenizing the passage here (instead of inside the
engine) tells the caller which documents were truncated and how many tokens
each request carries; the engine's processor keys its cache on the same ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kalm_t5gemma2_vllm_plugin.constants import (
    DEFAULT_SYSTEM_INSTRUCTION,
    PASSAGE_MODALITY,
)
from kalm_t5gemma2_vllm_plugin.errors import KaLMInputError
from kalm_t5gemma2_vllm_plugin.mep import pooled_length
from kalm_t5gemma2_vllm_plugin.prompt import (
    TokenizerLike,
    decoder_prompt_ids,
    encode_document,
    format_decoder_prompt,
)
from kalm_t5gemma2_vllm_plugin.store.format import PassageRecord, PassageStore
from kalm_t5gemma2_vllm_plugin.vllm_model.config import (
    KEY_FIELD,
    STATES_FIELD,
    EngineSettings,
)

__all__ = ["DocumentId", "EnginePrompt", "PromptBuilder"]


class DocumentId(str):
    """A document given by its id in the passage store, not by its text.

    Example:
        >>> reranker.predict([("query", DocumentId("doc-17")), ("query", "raw text")])
    """

    __slots__ = ()


@dataclass(frozen=True)
class EnginePrompt:
    """One engine request and what the caller reports about it."""

    prompt: dict[str, Any]
    #: The document was cut to the document length limit.
    truncated: bool
    #: Decoder prompt tokens plus encoder tokens.
    num_tokens: int


class PromptBuilder:
    """Builds engine prompts with the engine's KaLM settings."""

    def __init__(
        self,
        tokenizer: TokenizerLike,
        settings: EngineSettings,
        *,
        max_model_len: int,
        system_instruction: str = DEFAULT_SYSTEM_INSTRUCTION,
    ) -> None:
        self.tokenizer = tokenizer
        self.settings = settings
        self.max_model_len = max_model_len
        self.system_instruction = system_instruction

    def prompt_tokens(self, instruction: str) -> int:
        """Decoder prompt tokens with this instruction and an empty query."""
        return len(
            self.tokenizer(
                format_decoder_prompt("", instruction, self.system_instruction),
                add_special_tokens=False,
            )["input_ids"]
        )

    def check_instruction(self, instruction: str, field: str = "instruction") -> None:
        """Refuse an instruction with which a full-length query and document
        would not fit ``max_model_len``."""
        template = self.prompt_tokens(instruction)
        settings = self.settings
        needed = (
            template
            + settings.query_max_length
            + pooled_length(settings.document_max_length, settings.pool_factor)
        )
        if needed > self.max_model_len:
            raise KaLMInputError(
                f"max_model_len={self.max_model_len} is too small for this "
                f"{field}: a full-length query and document need {needed} positions "
                f"({template} prompt + {settings.query_max_length} query + pooled "
                f"document); raise max_model_len or lower query_max_length/"
                f"document_max_length.",
                field=field,
            )

    def build(
        self,
        pairs: Sequence[tuple[str, str]],
        instruction: str,
        *,
        document_max_length: int | None = None,
        store: PassageStore | None = None,
    ) -> list[EnginePrompt]:
        """Engine prompts for validated pairs, in order (one tokenization per query).

        A ``DocumentId`` document takes its precomputed states from ``store``
        (``UnknownDocumentError`` naming unknown ids). ``document_max_length``
        may only lower the engine's limit for text (per-request
        ``max_tokens_per_doc``); stored passages keep the length they were
        encoded with.
        """
        stored = self._stored(pairs, store)
        limit = self.settings.document_max_length
        if document_max_length is not None:
            limit = min(limit, document_max_length)
        decoder: dict[str, list[int]] = {}
        prompts = []
        for query, document in pairs:
            if query not in decoder:
                decoder[query] = decoder_prompt_ids(
                    self.tokenizer,
                    query,
                    query_max_length=self.settings.query_max_length,
                    instruction=instruction,
                    system_instruction=self.system_instruction,
                )
            if isinstance(document, DocumentId):
                record, states = stored[document]
                item: Any = {STATES_FIELD: states, KEY_FIELD: record.passage_key}
                truncated, tokens = record.truncated, record.num_tokens
            elif self.settings.decoder_only:
                raise KaLMInputError(
                    "This engine runs decoder-only (no encoder loaded): give "
                    "documents as ids of the passage store, not as text.",
                    field="documents",
                )
            else:
                passage = encode_document(self.tokenizer, document, limit)
                item, truncated, tokens = (
                    passage.ids,
                    passage.truncated,
                    len(passage.ids),
                )
            prompts.append(
                EnginePrompt(
                    prompt={
                        "prompt_token_ids": decoder[query],
                        "multi_modal_data": {PASSAGE_MODALITY: item},
                    },
                    truncated=truncated,
                    num_tokens=len(decoder[query]) + tokens,
                )
            )
        return prompts

    @staticmethod
    def _stored(
        pairs: Sequence[tuple[str, str]], store: PassageStore | None
    ) -> dict[str, tuple[PassageRecord, Any]]:
        ids = list(dict.fromkeys(d for _, d in pairs if isinstance(d, DocumentId)))
        if not ids:
            return {}
        if store is None:
            raise KaLMInputError(
                "Documents given by id need a passage store (passage_store=...).",
                field="document_ids",
            )
        return dict(zip(ids, store.load(ids), strict=True))
