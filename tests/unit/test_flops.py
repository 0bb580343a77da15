# SPDX-License-Identifier: Apache-2.0
"""``bench/flops.py`` against numbers computed by hand."""

from __future__ import annotations

from kalm_t5gemma2_vllm_plugin.bench.flops import Dims, kalm_flops, qwen3_flops

# d=4, intermediate 8, 1 layer, 2 heads of 2 (q width 4), 1 kv head (kv width 2)
DIMS = Dims(
    hidden=4, intermediate=8, layers=1, heads=2, kv_heads=1, head_dim=2, vocab=10
)


def test_projections_and_attention_by_hand() -> None:
    # per token: q 4*4 + k,v 2*(4*2) + o 4*4 + mlp 3*4*8 = 16 + 16 + 16 + 96
    assert DIMS.projections(3) == 2 * 3 * 144
    assert DIMS.attention(3, 5) == 4 * 3 * 5 * 2 * 2


def test_a_kalm_pair_by_hand() -> None:
    flops = kalm_flops(
        DIMS, encoder_tokens=6, decoder_tokens=4, pooled=2, full_vocab_head=False,
        encode=True,
    )  # fmt: skip
    assert flops["encoder"] == 2 * 6 * 144 + 4 * 6 * 6 * 4
    assert flops["decoder"] == 2 * 4 * 144 + 2 * 2 * 2 * 4 * 2
    assert flops["decoder_attention"] == 4 * 4 * (2 + 2) * 4
    assert flops["lm_head"] == 2 * 1 * 4 * 2  # two rows, last position only
    cached = kalm_flops(
        DIMS, encoder_tokens=6, decoder_tokens=4, pooled=2, full_vocab_head=True,
        encode=False,
    )  # fmt: skip
    assert "encoder" not in cached
    assert cached["lm_head"] == 2 * 4 * 4 * 10  # every position, every row


def test_a_cross_encoder_pair_by_hand() -> None:
    flops = qwen3_flops(DIMS, tokens=10)
    assert flops["decoder"] == 2 * 10 * 144
    assert flops["attention"] == 4 * 10 * 5 * 4
    assert flops["score_head"] == 8
