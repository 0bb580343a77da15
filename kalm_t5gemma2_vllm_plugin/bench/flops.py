# SPDX-License-Identifier: Apache-2.0
"""Analytic FLOPs per scored pair, by component, so "fraction of peak" can be
checked by hand.

Convention: a multiply-add is 2 FLOPs; ``n`` tokens through a ``d_in -> d_out``
linear layer cost ``2 * n * d_in * d_out``. Attention costs ``4 * n_q * n_k *
heads * head_dim`` (scores plus weighted sum) over the keys each query sees;
norms, activations, RoPE and softmax are memory-bound and not counted. Counts
use real tokens, not padding, so padding waste shows up as lower efficiency.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Dims", "kalm_flops", "qwen3_flops"]


@dataclass(frozen=True)
class Dims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    sliding_window: int | None = None

    def projections(self, tokens: int) -> int:
        """q, k, v, o projections and the gated MLP, per layer."""
        d, q, kv = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
        )
        return 2 * tokens * (d * q + 2 * d * kv + q * d + 3 * d * self.intermediate)

    def attention(self, queries: int, keys: int) -> int:
        return 4 * queries * keys * self.heads * self.head_dim


def kalm_flops(
    dims: Dims,
    *,
    encoder_tokens: int,
    decoder_tokens: int,
    pooled: int,
    full_vocab_head: bool,
    encode: bool,
) -> dict[str, int]:
    """One KaLM pair: encoder (if the passage is encoded), decoder with merged
    attention over ``pooled`` states, and the LM head (2 rows, or every row at
    every decoder position as the reference computes it)."""
    L, T, C = encoder_tokens, decoder_tokens, pooled
    window = dims.sliding_window or L
    flops: dict[str, int] = {}
    if encode:
        # Bidirectional attention; sliding layers see at most `window` keys.
        flops["encoder"] = dims.layers * (
            dims.projections(L) + dims.attention(L, min(L, window))
        )
    cross_kv = 2 * 2 * C * dims.hidden * dims.kv_heads * dims.head_dim
    flops["decoder"] = dims.layers * (dims.projections(T) + cross_kv)
    # Causal self-attention (~T/2 keys on average) plus every pooled state.
    flops["decoder_attention"] = dims.layers * dims.attention(T, T // 2 + C)
    rows = dims.vocab if full_vocab_head else 2
    head_positions = T if full_vocab_head else 1
    flops["lm_head"] = 2 * head_positions * dims.hidden * rows
    flops["total"] = sum(flops.values())
    return flops


def qwen3_flops(dims: Dims, *, tokens: int) -> dict[str, int]:
    """One cross-encoder pair: the whole prompt through the decoder, one score row."""
    flops = {
        "decoder": dims.layers * dims.projections(tokens),
        "attention": dims.layers * dims.attention(tokens, tokens // 2),
        "score_head": 2 * dims.hidden,
    }
    flops["total"] = sum(flops.values())
    return flops
