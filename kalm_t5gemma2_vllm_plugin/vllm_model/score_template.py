# SPDX-License-Identifier: Apache-2.0
"""vLLM's score API for KaLM: the text its score template produces for a pair,
and how the passage processor unpacks it again.

vLLM's score API tokenizes one text per pair; the plugin's processor decodes
it, splits the fields and builds the real KaLM prompt with ``prompt``, so the
score API applies exactly the same template and truncation as every other
path. ``data/kalm_score_template.jinja`` (for ``vllm serve``) emits the same
layout; a test keeps the two equal.
"""

from __future__ import annotations

from importlib import resources

from kalm_t5gemma2_vllm_plugin.errors import KaLMInputError

__all__ = [
    "JINJA_TEMPLATE",
    "SCORE_SEPARATOR",
    "pack_score_text",
    "unpack_score_text",
]

#: Separates query, instruction and document in the score-API template; a
#: string no real text contains, and that every tokenizer decodes back as is.
SCORE_SEPARATOR = "\u241eKaLM\u241e"
#: The chat template for ``vllm serve --chat-template`` (score routes).
JINJA_TEMPLATE = (
    resources.files("kalm_t5gemma2_vllm_plugin")
    / "data"
    / ("kalm_score_template.jinja")
)


def pack_score_text(query: str, document: str, instruction: str = "") -> str:
    """The text vLLM's score API tokenizes for one pair (``get_score_template``).

    The plugin's processor decodes it back and builds the real KaLM prompt with
    the functions above, so the score API applies exactly the same template and
    truncation as every other path. An empty instruction means the default.
    The Jinja score template shipped with the package emits the same layout.
    """
    for name, value in (("query", query), ("instruction", instruction)):
        if SCORE_SEPARATOR in value:
            raise KaLMInputError(
                f"The {name} contains the reserved separator {SCORE_SEPARATOR!r}.",
                field=name,
            )
    sep = SCORE_SEPARATOR
    return f"{sep}{query}{sep}{instruction}{sep}{document}"


def unpack_score_text(text: str) -> tuple[str, str, str]:
    """Split a decoded score prompt into ``(query, instruction, document)``.

    Anything before the first separator (the tokenizer's ``<bos>``) is dropped;
    the document comes last, so a separator inside it cannot shift the fields.
    """
    parts = text.split(SCORE_SEPARATOR, 3)
    if len(parts) != 4:
        raise KaLMInputError(
            "A score prompt for the KaLM reranker must come from its score "
            f"template (query, instruction and document separated by "
            f"{SCORE_SEPARATOR!r}); found {len(parts) - 1} separators."
        )
    _, query, instruction, document = parts
    return query, instruction, document
