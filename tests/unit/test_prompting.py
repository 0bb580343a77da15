# SPDX-License-Identifier: Apache-2.0
import hashlib
import re

import pytest

from kalm_t5gemma2_vllm_plugin import prompt as prompting
from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import build_tokenizer
from kalm_t5gemma2_vllm_plugin.errors import KaLMConfigError, KaLMInputError
from kalm_t5gemma2_vllm_plugin.vllm_model import score_template
from kalm_t5gemma2_vllm_plugin.vllm_model.score_template import SCORE_SEPARATOR

SAMPLE_PROMPT = (
    "<bos><start_of_turn>user\nJudge whether the Document meets the requirements "
    "based on the Query and the Instruct provided. Note that the answer can only be "
    '"yes" or "no".\n\n<Instruct>: Given a query, retrieve documents that answer the '
    "query.\n<Query>: What is the capital of China?<end_of_turn>\n<start_of_turn>model"
    "\n\n\n\n"
)


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return build_tokenizer()


def test_decoder_prompt_is_character_exact() -> None:
    text = prompting.format_decoder_prompt("What is the capital of China?")
    assert text == SAMPLE_PROMPT
    assert len(text) == 315
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert digest == "6b120fe07ee968dfad28c7b0a531ccd56b33b698c59677bf0c87760ab17cb03e"


def test_decoder_prompt_ids_start_with_one_bos_and_end_with_model_turn(
    tokenizer,
) -> None:
    ids = prompting.decoder_prompt_ids(
        tokenizer, "What is the capital of China?", query_max_length=512
    )
    assert ids[:4] == [2, 105, 2364, 107]  # <bos> <start_of_turn> user \n
    assert ids.count(2) == 1
    # ... ? <end_of_turn> \n <start_of_turn> model \n\n\n\n
    assert ids[-5:] == [106, 107, 105, 4368, 110]
    query_ids = tokenizer("What is the capital of China?", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(query_ids["input_ids"]) == [
        "What",
        "▁is",
        "▁the",
        "▁capital",
        "▁of",
        "▁China",
        "?",
    ]


def test_truncate_query_cuts_tokens_then_decodes(tokenizer) -> None:
    query = "What is the capital of China?"
    assert prompting.truncate_query(tokenizer, query, 3) == "What is the"
    assert prompting.truncate_query(tokenizer, query, 512) == query
    # CJK goes through byte fallback and round-trips exactly.
    assert prompting.truncate_query(tokenizer, "北京 is 首都", 512) == "北京 is 首都"


@pytest.mark.parametrize(
    "query,kept",
    [
        ("北" * 200, "北" * 170),  # 600 byte tokens, the cut falls inside a character
        ("a" + "😀" * 300, "a" + "😀" * 127),
        ("😀" * 200, "😀" * 128),  # cuts between characters stay where they are
        ("é" * 600, "é" * 256),
    ],
    ids=[
        "cjk-cut-mid-character",
        "emoji-cut-mid-character",
        "emoji-aligned",
        "latin-aligned",
    ],
)
def test_a_truncated_query_holds_the_limit_even_cut_in_a_byte_fallback_run(
    tiny_checkpoint, query: str, kept: str
) -> None:
    """F9: decoding a byte run cut mid-character gave one U+FFFD per byte,
    which re-encoded to 3x the limit (1536 tokens for "北" * 200)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    truncated = prompting.truncate_query(tokenizer, query, 512)
    assert truncated == kept
    assert len(tokenizer(truncated, add_special_tokens=False)["input_ids"]) <= 512
    # and the whole decoder prompt grows by no more than the limit
    empty = prompting.decoder_prompt_ids(tokenizer, "", query_max_length=512)
    full = prompting.decoder_prompt_ids(tokenizer, query, query_max_length=512)
    assert len(full) - len(empty) <= 512


def test_truncated_query_changes_only_the_query_field(tokenizer) -> None:
    ids = prompting.decoder_prompt_ids(
        tokenizer, "What is the capital of China?", query_max_length=2
    )
    text = tokenizer.decode(
        ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    assert text == SAMPLE_PROMPT.replace("What is the capital of China?", "What is")


def test_document_prefix_counts_toward_max_length(tokenizer) -> None:
    doc = "The capital of China is Beijing."
    full = prompting.encode_document(tokenizer, doc, 1024)
    assert tokenizer.convert_ids_to_tokens(full.ids) == [
        "<",
        "Document",
        ">:",
        "▁The",
        "▁capital",
        "▁of",
        "▁China",
        "▁is",
        "▁Beijing",
        ".",
    ]
    assert not full.truncated and full.num_tokens == 10
    cut = prompting.encode_document(tokenizer, doc, 5)
    assert cut.ids == full.ids[:5] and cut.truncated and cut.num_tokens == 10


def test_empty_document_still_has_the_prefix(tokenizer) -> None:
    encoded = prompting.encode_document(tokenizer, "", 1024)
    assert tokenizer.convert_ids_to_tokens(encoded.ids) == ["<", "Document", ">:", "▁"]


def test_yes_no_ids_are_checked(tokenizer) -> None:
    assert prompting.check_yes_no_tokens(tokenizer) == (4443, 1904)

    class SplitsYes:
        def __call__(self, text: str, *, add_special_tokens: bool = False) -> dict:
            return {"input_ids": [1, 2] if text == "yes" else [7]}

    with pytest.raises(KaLMConfigError, match=re.escape("'yes' as 2 tokens")):
        prompting.check_yes_no_tokens(SplitsYes())  # type: ignore[arg-type]


def test_score_text_round_trips_fields() -> None:
    text = score_template.pack_score_text(
        "q?", "doc " + SCORE_SEPARATOR + " tail", "inst"
    )
    assert score_template.unpack_score_text("<bos>" + text) == (
        "q?",
        "inst",
        "doc " + SCORE_SEPARATOR + " tail",
    )
    with pytest.raises(KaLMInputError, match="query contains the reserved separator"):
        score_template.pack_score_text("a" + SCORE_SEPARATOR, "d")
    with pytest.raises(KaLMInputError, match="found 1 separators"):
        score_template.unpack_score_text("x" + SCORE_SEPARATOR + "y")
