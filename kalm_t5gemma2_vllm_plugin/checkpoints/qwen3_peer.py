# SPDX-License-Identifier: Apache-2.0
"""A random Qwen3-Reranker-shaped checkpoint: the cross-encoder peer that
``kalm-vllm-bench`` measures KaLM against (never used to score)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import (
    randomize_weights,
    unigram_tokenizer,
)
from kalm_t5gemma2_vllm_plugin.validation import parse_dtype

__all__ = ["QWEN3_PRESETS", "make_cross_encoder_checkpoint"]

# Qwen3 config fields by preset, as a table: the real 0.6B and a tiny one.
_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)
QWEN3_PRESETS: dict[str, dict[str, Any]] = {
    name: dict(zip(_FIELDS, values, strict=True), vocab_size=151936)
    for name, values in {
        "qwen3-0.6b": (1024, 3072, 28, 16, 8, 128, 40960),
        "tiny": (128, 256, 2, 2, 1, 64, 4096),
    }.items()
}
# Real Qwen3 ids of the tokens the reranker prompt and head depend on.
_QWEN3_FIXED_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<think>": 151667,
    "</think>": 151668,
    "yes": 9693,
    "no": 2152,
    "\n": 198,
    "\n\n": 271,
}
_QWEN3_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def make_cross_encoder_checkpoint(
    path: str | Path,
    preset: str = "qwen3-0.6b",
    *,
    seed: int = 0,
    dtype: str | torch.dtype = torch.bfloat16,
) -> Path:
    """A random Qwen3-Reranker-shaped checkpoint (``Qwen3ForCausalLM``) for benchmarks.

    vLLM serves it as ``Qwen3ForSequenceClassification`` with its yes/no head
    (``classifier_from_token``), like the real Qwen3-Reranker. The tokenizer
    keeps Qwen3's ids for the chat markers and ``yes``/``no``, and makes the
    same words single tokens as the KaLM test tokenizer, so token counts match.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = Qwen3Config(
        **QWEN3_PRESETS[preset],
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        bos_token_id=151643,
        eos_token_id=151645,
        pad_token_id=151643,
    )
    config.architectures = ["Qwen3ForCausalLM"]
    model = Qwen3ForCausalLM(config)
    randomize_weights(model, config.hidden_size, seed, norm_center=1.0)
    dtype = getattr(torch, parse_dtype(dtype) or "bfloat16")
    model.to(dtype).save_pretrained(out)
    unigram_tokenizer(
        _QWEN3_FIXED_IDS,
        _QWEN3_SPECIAL,
        151669,
        bos_token=None,
        extra_words=("system", "assistant"),
        eos="<|im_end|>",
        pad="<|endoftext|>",
    ).save_pretrained(out)
    return out
