# SPDX-License-Identifier: Apache-2.0
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, T5Gemma2ForConditionalGeneration

from kalm_t5gemma2_vllm_plugin import prompt as prompting
from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import (
    build_config,
    build_tokenizer,
    make_checkpoint,
    synthetic_text,
)
from kalm_t5gemma2_vllm_plugin.cli.make_checkpoint import main

# model.md §5.2: Nano read off the real config; Small/Large inferred.
EXPECTED_DIMS = {
    "nano": (640, 2048, 18, 4, 1, 256, 512),
    "small": (1152, 6912, 26, 4, 1, 256, 512),
    "large": (2560, 10240, 34, 8, 4, 256, 1024),
}


@pytest.mark.parametrize("preset", sorted(EXPECTED_DIMS))
def test_preset_configs_have_the_documented_dimensions(preset: str) -> None:
    config = build_config(preset)
    for text in (config.encoder.text_config, config.decoder):
        dims = (
            text.hidden_size,
            text.intermediate_size,
            text.num_hidden_layers,
            text.num_attention_heads,
            text.num_key_value_heads,
            text.head_dim,
            text.sliding_window,
        )
        assert dims == EXPECTED_DIMS[preset]
        assert text.vocab_size == 262144
        # five sliding layers, then one full
        assert [
            i for i, t in enumerate(text.layer_types) if t == "full_attention"
        ] == list(range(5, text.num_hidden_layers, 6))
    assert config.model_type == "t5gemma2" and config.is_encoder_decoder
    assert config.architectures == ["T5Gemma2ForConditionalGeneration"]


def test_overrides_apply_to_encoder_and_decoder() -> None:
    config = build_config("tiny", sliding_window=4, num_hidden_layers=3)
    for text in (config.encoder.text_config, config.decoder):
        assert text.sliding_window == 4 and text.num_hidden_layers == 3
        assert len(text.layer_types) == 3


def test_tiny_checkpoint_has_the_real_layout(tiny_checkpoint: Path) -> None:
    names = sorted(p.name for p in tiny_checkpoint.iterdir())
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= set(names)
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "t5gemma2"
    assert config["architectures"] == ["T5Gemma2ForConditionalGeneration"]
    with safe_open(tiny_checkpoint / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert "model.encoder.embed_tokens.weight" in keys
    assert "model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "model.decoder.layers.1.mlp.down_proj.weight" in keys
    assert any(k.startswith("model.encoder.vision_tower.") for k in keys)
    assert not any(
        k.startswith(("lm_head.", "model.decoder.embed_tokens")) for k in keys
    )


def test_tiny_checkpoint_loads_and_its_tokenizer_has_gemma_ids(
    tiny_checkpoint: Path,
) -> None:
    model = T5Gemma2ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    assert model.config.decoder.hidden_size == 64
    assert AutoConfig.from_pretrained(tiny_checkpoint).model_type == "t5gemma2"
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    expected = {
        "<pad>": 0,
        "<eos>": 1,
        "<bos>": 2,
        "<unk>": 3,
        "<start_of_turn>": 105,
        "<end_of_turn>": 106,
        "yes": 4443,
        "no": 1904,
    }
    for token, token_id in expected.items():
        assert tok.convert_tokens_to_ids(token) == token_id
    assert prompting.check_yes_no_tokens(tok) == (4443, 1904)
    assert tok("hi")["input_ids"][0] == 2  # Gemma prepends <bos> with special tokens


def test_weights_depend_on_the_seed(tmp_path: Path) -> None:
    def embedding(seed: int) -> torch.Tensor:
        path = make_checkpoint(tmp_path / str(seed), seed=seed)
        with safe_open(path / "model.safetensors", "pt") as f:
            return f.get_tensor("model.encoder.embed_tokens.weight")

    first, again, other = embedding(0), embedding(0), embedding(1)
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize(
    "text",
    [
        "北京是中国的首都",
        "emoji 🙂 and naïve café",
        "tabs\tand\nnewlines  double  spaces",
        "<Document>: <end_of_turn> literal",
        "ﬁ ligature, \u0000 NUL, \U0010ffff",
    ],
    ids=["cjk", "emoji", "whitespace", "special-text", "odd-codepoints"],
)
def test_tokenizer_loses_no_text(text: str) -> None:
    tok = build_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert 3 not in ids  # no <unk>
    assert (
        tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        == text
    )


def test_common_words_and_template_words_are_single_tokens() -> None:
    tok = build_tokenizer()
    empty_query = prompting.decoder_prompt_ids(tok, "", query_max_length=512)
    assert len(empty_query) == 59  # stated in the README
    for word in (
        "The",
        " capital",
        " of",
        " retrieve",
        " documents",
        " Judge",
        " whether",
    ):
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word


def test_synthetic_text_has_exact_token_counts() -> None:
    tok = build_tokenizer()
    for n in (1, 17, 256):
        assert (
            len(tok(synthetic_text(n, seed=n), add_special_tokens=False)["input_ids"])
            == n
        )


def test_make_checkpoint_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(tmp_path / "ck"), "--seed", "3", "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "ck")
    with safe_open(tmp_path / "ck" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.decoder.norm.weight").dtype == torch.bfloat16


def test_checkpoint_keys_map_in_both_layouts() -> None:
    from kalm_t5gemma2_vllm_plugin.t5gemma2 import checkpoint_target

    def engine(name: str) -> str | None:  # as the vLLM model loads them
        return checkpoint_target(
            name,
            encoder_prefix="encoder.",
            embedding="decoder.embed_tokens",
            decoder_prefix="decoder.",
        )

    layer = "layers.0.self_attn.q_proj.weight"
    # on disk and in Transformers 5's memory layout: the same target
    assert engine(f"model.encoder.{layer}") == f"encoder.{layer}"
    assert engine(f"model.encoder.text_model.{layer}") == f"encoder.{layer}"
    assert engine(f"model.decoder.{layer}") == f"decoder.{layer}"
    # one shared embedding table
    for name in (
        "model.encoder.embed_tokens.weight",
        "model.encoder.text_model.embed_tokens.weight",
    ):
        assert engine(name) == "decoder.embed_tokens.weight"
    # never read: the vision tower, and the tied copies of the embedding
    for name in ("model.encoder.vision_tower.x.weight", "lm_head.weight"):
        assert engine(name) is None
    # the passage encoder alone: no decoder, its own embedding name
    encoder_only = checkpoint_target(
        f"model.decoder.{layer}",
        encoder_prefix="",
        embedding="embed_tokens",
        decoder_prefix=None,
    )
    assert encoder_only is None
