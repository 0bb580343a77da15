# SPDX-License-Identifier: Apache-2.0
"""The KaLM prompt: decoder template, query truncation and document truncation.

Pure functions over a tokenizer passed in by the caller, so this module stays
light (no torch, no transformers). Every score path builds its inputs here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kalm_t5gemma2_vllm_plugin.constants import (
    DEFAULT_INSTRUCTION,
    DEFAULT_SYSTEM_INSTRUCTION,
    NO_TOKEN,
    YES_TOKEN,
)
from kalm_t5gemma2_vllm_plugin.errors import KaLMConfigError

__all__ = [
    "EncodedDocument",
    "TokenizerLike",
    "check_yes_no_tokens",
    "decoder_prompt_ids",
    "document_text",
    "encode_document",
    "format_decoder_prompt",
    "truncate_query",
]


#: The literal prefix of every encoder input.
DOCUMENT_PREFIX = "<Document>: "
# The decoder prompt, character-exact (model.md §2.3). "<bos>" is literal text.
DECODER_TEMPLATE = (
    "<bos><start_of_turn>user\n{system_instruction}\n\n<Instruct>: {instruction}\n"
    "<Query>: {query}<end_of_turn>\n<start_of_turn>model\n\n\n\n"
)


class TokenizerLike(Protocol):
    """The part of a Hugging Face tokenizer the prompt code needs."""

    def __call__(self, text: str, *, add_special_tokens: bool = ...) -> Any: ...

    def decode(
        self,
        token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = ...,
        clean_up_tokenization_spaces: bool = ...,
    ) -> str: ...


@dataclass(frozen=True)
class EncodedDocument:
    """Encoder input ids of one document (prefix included) and whether it was cut."""

    ids: list[int]
    truncated: bool
    #: Tokens of ``"<Document>: " + document`` before truncation.
    num_tokens: int


def _ids(tokenizer: TokenizerLike, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def format_decoder_prompt(
    query: str,
    instruction: str = DEFAULT_INSTRUCTION,
    system_instruction: str = DEFAULT_SYSTEM_INSTRUCTION,
) -> str:
    """The decoder text for an already-truncated query (character-exact)."""
    return DECODER_TEMPLATE.format(
        system_instruction=system_instruction, instruction=instruction, query=query
    )


def truncate_query(tokenizer: TokenizerLike, query: str, max_length: int) -> str:
    """Cut ``query`` to ``max_length`` tokens and decode it back to text.

    KaLM truncates the query alone, at the string level, before the template
    is filled in; the rest of the decoder prompt is never cut. The round trip
    runs even for short queries, as in the original implementation, so a
    tokenizer that normalises text (e.g. a literal "▁") is treated the same way.

    A cut inside a character (a byte-fallback run cut mid-sequence) would
    decode to one U+FFFD per byte, which re-encodes to up to 3x the tokens: the
    cut then moves back, one token at a time, until the text it gives encodes
    to at most ``max_length`` tokens. (The original implementation does not
    check this; on the inputs where the two differ its query is garbage.)
    """
    ids = _ids(tokenizer, query)
    keep = min(len(ids), max_length)
    while True:
        text = tokenizer.decode(
            ids[:keep], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        if keep == len(ids) or keep == 0 or len(_ids(tokenizer, text)) <= max_length:
            return text
        keep -= 1


def decoder_prompt_ids(
    tokenizer: TokenizerLike,
    query: str,
    *,
    query_max_length: int,
    instruction: str = DEFAULT_INSTRUCTION,
    system_instruction: str = DEFAULT_SYSTEM_INSTRUCTION,
) -> list[int]:
    """Token ids of the decoder prompt; ``<bos>`` comes from the literal text."""
    text = format_decoder_prompt(
        truncate_query(tokenizer, query, query_max_length),
        instruction,
        system_instruction,
    )
    return _ids(tokenizer, text)


def document_text(document: str) -> str:
    """The encoder text: the literal ``"<Document>: "`` prefix, then the document."""
    return DOCUMENT_PREFIX + document


def encode_document(
    tokenizer: TokenizerLike, document: str, max_length: int
) -> EncodedDocument:
    """Encoder ids of ``document``, head kept; the prefix counts toward the limit."""
    ids = _ids(tokenizer, document_text(document))
    return EncodedDocument(ids[:max_length], len(ids) > max_length, len(ids))


def check_yes_no_tokens(tokenizer: TokenizerLike) -> tuple[int, int]:
    """Return the ids of ``yes`` and ``no``; refuse a tokenizer that splits either."""
    found = []
    for token in (YES_TOKEN, NO_TOKEN):
        ids = _ids(tokenizer, token)
        if len(ids) != 1:
            raise KaLMConfigError(
                f"The tokenizer encodes {token!r} as {len(ids)} tokens {ids}; KaLM "
                f"scores need {token!r} to be exactly one token."
            )
        found.append(ids[0])
    return found[0], found[1]
