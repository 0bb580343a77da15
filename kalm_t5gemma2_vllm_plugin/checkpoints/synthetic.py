# SPDX-License-Identifier: Apache-2.0
"""Locally generated KaLM-Reranker-V1 checkpoints for tests and benchmarks.

No weights can be downloaded in CI, so :func:`make_checkpoint` writes a random
checkpoint laid out exactly like a real one (``model_type`` ``t5gemma2``,
``T5Gemma2ForConditionalGeneration``, the same tensor names, a tiny vision
tower) together with a fast tokenizer that keeps the real Gemma 3 ids of every
token the model depends on.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, processors
from transformers import (
    PreTrainedTokenizerFast,
    T5Gemma2Config,
    T5Gemma2ForConditionalGeneration,
)

from kalm_t5gemma2_vllm_plugin import constants as C
from kalm_t5gemma2_vllm_plugin.validation import parse_dtype

__all__ = [
    "PRESETS",
    "TOKENIZER_VOCAB_SIZE",
    "build_config",
    "build_tokenizer",
    "make_checkpoint",
    "synthetic_text",
]

#: Entries in the synthetic tokenizer; ids above it are never produced.
TOKENIZER_VOCAB_SIZE = 8192
_REAL_VOCAB_SIZE = 262144
_SPACE = "\u2581"  # SentencePiece's space marker, as in Gemma

# Text dimensions per preset. Nano is read off the real config; Small and Large
# are inferred from parameter counts and the Gemma 3 1B/4B configs (model.md
# §5.2): their sliding windows and max positions are unverified.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=16,
        max_position_embeddings=4096,
    ),
    "nano": dict(
        vocab_size=_REAL_VOCAB_SIZE,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=512,
        max_position_embeddings=32768,
    ),
    "small": dict(
        vocab_size=_REAL_VOCAB_SIZE,
        hidden_size=1152,
        intermediate_size=6912,
        num_hidden_layers=26,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=512,
        max_position_embeddings=32768,
    ),
    "large": dict(
        vocab_size=_REAL_VOCAB_SIZE,
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=34,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=1024,
        max_position_embeddings=131072,
    ),
}
# The real tower is a 400M-parameter SigLIP; KaLM never uses it, so ours is tiny.
_TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=32,
    patch_size=16,
    num_channels=3,
)
_ROPE = {
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
}
# Gemma 3 ids the model and prompt depend on. 108-110 (runs of newlines) are
# modelled on Gemma's merged newline pieces; their exact ids are not verified.
_FIXED_IDS = {
    "<pad>": C.PAD_TOKEN_ID,
    "<eos>": C.EOS_TOKEN_ID,
    "<bos>": C.BOS_TOKEN_ID,
    "<unk>": C.UNK_TOKEN_ID,
    "<mask>": 4,
    "[multimodal]": 5,
    "<start_of_turn>": C.START_OF_TURN_TOKEN_ID,
    "<end_of_turn>": C.END_OF_TURN_TOKEN_ID,
    "\n": 107,
    "\n\n": 108,
    "\n\n\n": 109,
    "\n\n\n\n": 110,
    C.NO_TOKEN: C.NO_TOKEN_ID,
    "user": 2364,
    "model": 4368,
    C.YES_TOKEN: C.YES_TOKEN_ID,
}
_SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "[multimodal]",
    "<start_of_turn>",
    "<end_of_turn>",
]
# Punctuation runs the real vocabulary has as single pieces.
_PUNCTUATION = [">:", '".', '",', "'s", "),", ").", "...", "--", " (", ' "', " -"]


def _english_words() -> list[str]:
    text = (
        resources.files("kalm_t5gemma2_vllm_plugin")
        .joinpath("data/english_words.txt")
        .read_text(encoding="utf-8")
    )
    words: dict[str, None] = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            words.update(dict.fromkeys(line.split()))
    return list(words)


def _word_pieces(extra_words: tuple[str, ...] = ()) -> list[str]:
    """Pieces for every word of the prompt template and of the word list."""
    template_text = " ".join(
        [
            C.DEFAULT_SYSTEM_INSTRUCTION,
            C.DEFAULT_INSTRUCTION,
            "Instruct Query Document",
            "Given a web search query, retrieve passages that answer the query.",
        ]
    )
    words = [w.strip('.,:"?<>') for w in template_text.split()]
    words += list(extra_words) + _english_words()
    pieces: list[str] = []
    for word in dict.fromkeys(w for w in words if w):
        for form in dict.fromkeys((word, word.capitalize())):
            pieces += [form, _SPACE + form]
    return pieces


def unigram_tokenizer(
    fixed_ids: dict[str, int],
    special_tokens: list[str],
    vocab_size: int,
    *,
    bos_token: str | None,
    extra_words: tuple[str, ...] = (),
    **token_roles: str,
) -> PreTrainedTokenizerFast:
    """A unigram tokenizer over whole words, ASCII characters and byte pieces.

    ``fixed_ids`` pins the ids of the tokens a model depends on; everything
    else fills the free ids. The fewest pieces win, so every listed word is one
    token, and byte fallback makes any Unicode text encodable and lossless.
    """
    ids: dict[str, int] = dict(fixed_ids)
    taken = set(ids.values())
    free = iter(i for i in range(vocab_size) if i not in taken)
    pieces = [f"<0x{b:02X}>" for b in range(256)]
    pieces += [_SPACE] + [chr(c) for c in range(33, 127)]
    pieces += [p.replace(" ", _SPACE) for p in _PUNCTUATION + _word_pieces(extra_words)]
    for piece in pieces:
        if piece not in ids:
            ids[piece] = next(free)
    for i in free:
        ids[f"<unused{i}>"] = i
    by_id = sorted(ids.items(), key=lambda kv: kv[1])
    assert [i for _, i in by_id] == list(range(vocab_size))
    # Fewest pieces wins; fillers are never chosen over real pieces.
    vocab = [
        (piece, -1e6 if piece.startswith("<unused") else -1.0 - 0.5 * (len(piece) == 1))
        for piece, _ in by_id
    ]
    unk = fixed_ids.get("<unk>", fixed_ids[special_tokens[0]])
    tok = Tokenizer(models.Unigram(vocab, unk_id=unk, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", _SPACE)
    tok.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    if bos_token is not None:  # Gemma prepends <bos> with add_special_tokens=True
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A $B:1",
            special_tokens=[(bos_token, fixed_ids[bos_token])],
        )
    roles = {f"{role}_token": token for role, token in token_roles.items()}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos_token,
        padding_side="right",
        model_max_length=131072,
        **roles,
    )
    others = [t for t in special_tokens if t not in (bos_token, *roles.values())]
    fast.add_special_tokens({"additional_special_tokens": others})
    for token in special_tokens:
        assert fast.convert_tokens_to_ids(token) == fixed_ids[token], token
    return fast


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A Gemma-like fast tokenizer with real ids for the tokens KaLM depends on.

    Any Unicode text tokenizes and decodes back unchanged, common English words
    are one token each, and ``<bos>`` is prepended only when
    ``add_special_tokens=True``, as Gemma's tokenizer does.
    """
    return unigram_tokenizer(
        _FIXED_IDS,
        _SPECIAL_TOKENS,
        TOKENIZER_VOCAB_SIZE,
        bos_token="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        mask="<mask>",
    )


def build_config(preset: str = "tiny", **config_overrides: Any) -> T5Gemma2Config:
    """The T5Gemma2 config of ``preset``; overrides apply to encoder and decoder."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}.")
    text = dict(PRESETS[preset])
    if "layer_types" not in config_overrides:
        # Real models: five sliding layers then one full; tiny: alternate.
        period = 2 if preset == "tiny" else 6
        layers = config_overrides.get("num_hidden_layers", text["num_hidden_layers"])
        text["layer_types"] = [
            "full_attention" if (i + 1) % period == 0 else "sliding_attention"
            for i in range(layers)
        ]
    text.update(config_overrides)
    text.update(
        rope_parameters=_ROPE,
        pad_token_id=C.PAD_TOKEN_ID,
        eos_token_id=C.EOS_TOKEN_ID,
        bos_token_id=C.BOS_TOKEN_ID,
        tie_word_embeddings=True,
        final_logit_softcapping=text.get("final_logit_softcapping"),
    )
    vocab = text["vocab_size"]
    config = T5Gemma2Config(
        encoder=dict(
            text_config=text,
            vision_config=_TINY_VISION,
            mm_tokens_per_image=4,
            boi_token_index=vocab - 3,
            eoi_token_index=vocab - 2,
            image_token_index=vocab - 1,
        ),
        decoder=dict(text),
        image_token_index=vocab - 1,
        eoi_token_index=vocab - 2,
    )
    config.architectures = ["T5Gemma2ForConditionalGeneration"]
    return config


@torch.no_grad()
def randomize_weights(
    model: torch.nn.Module, hidden_size: int, seed: int, norm_center: float = 0.0
) -> None:
    """Seeded weights scaled so activations stay O(1) and margins spread over ~±5.

    The library's own init (zero norms, std 0.02) gives margins near 0 for every
    pair, which would make score comparisons in tests meaningless.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if "norm" in name:
            std = 0.2  # T5Gemma2's RMSNorm multiplies by (1 + weight)
        elif name.endswith("embed_tokens.weight"):
            std = 3.0 / math.sqrt(2 * hidden_size)  # margin = h · (E[yes] − E[no])
        elif param.dim() >= 2:
            std = 1.0 / math.sqrt(param.shape[-1])
        else:
            std = 0.5
        values = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        param.copy_(values * std + (norm_center if "norm" in name else 0.0))


def make_checkpoint(
    path: str | Path,
    preset: str = "tiny",
    *,
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a random KaLM-Reranker-V1-shaped checkpoint directory and return it.

    Args:
        path: output directory (created).
        preset: ``"tiny"`` for tests, or ``"nano"``/``"small"``/``"large"`` with
            the real text dimensions, for benchmarks.
        seed: seed of the random weights.
        dtype: stored dtype; float32 for ``tiny``, bfloat16 (as released) otherwise.
        **config_overrides: text-config fields applied to encoder and decoder,
            e.g. ``sliding_window=8`` or ``num_hidden_layers=3``.

    Example:
        >>> from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import make_checkpoint
        >>> make_checkpoint("/tmp/kalm-tiny").name
        'kalm-tiny'
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if dtype is None:
        dtype = torch.float32 if preset == "tiny" else torch.bfloat16
    else:
        dtype = getattr(torch, parse_dtype(dtype) or "float32")
    config = build_config(preset, **config_overrides)
    model = T5Gemma2ForConditionalGeneration(config)
    randomize_weights(model, config.decoder.hidden_size, seed)
    model.to(dtype).save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out


# Qwen3-0.6B, the base of Qwen3-Reranker-0.6B: the cross-encoder KaLM competes
# with. The tiny variant keeps vLLM's CPU attention happy (head_dim 64).
def synthetic_text(num_tokens: int, *, seed: int = 0, capitalize: bool = True) -> str:
    """Text of exactly ``num_tokens`` tokens under :func:`build_tokenizer`.

    Words are drawn from the tokenizer's word list (each is one token); used by
    benchmarks to build documents and queries of exact lengths.
    """
    import random

    rng = random.Random(seed)
    words = [rng.choice(_WORDS) for _ in range(num_tokens)]
    if capitalize and words:
        words[0] = words[0].capitalize()
    return " ".join(words)


_WORDS = [
    w
    for w in _english_words()
    if w.isalpha() and w.islower() and w not in (C.YES_TOKEN, C.NO_TOKEN)
]
