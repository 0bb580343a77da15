# SPDX-License-Identifier: Apache-2.0
"""Matryoshka chunk pooling (MEP) of encoder states, shared by every score path
(not to be confused with vLLM's ``Pooler``, which is ``vllm_model/pooler.py``).

torch is imported inside ``mep_pool`` so that ``pooled_length`` stays usable
from the light modules (prompt building, the HTTP layer).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["mep_pool", "pooled_length", "repool"]


def pooled_length(num_tokens: int, chunk_size: int | None) -> int:
    """Pooled states of a passage of ``num_tokens`` valid tokens: ``ceil(L / N)``."""
    return num_tokens if chunk_size is None else math.ceil(num_tokens / chunk_size)


def mep_pool(
    hidden: torch.Tensor, mask: torch.Tensor, chunk_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked mean over chunks of ``chunk_size`` positions.

    Args:
        hidden: ``[B, L, d]`` encoder states after the final norm.
        mask: ``[B, L]`` 1 for real tokens, 0 for padding (right padding).
        chunk_size: pooling factor N, or ``None`` for no pooling.

    Returns:
        ``pooled [B, ceil(L/N), d]`` in ``hidden``'s dtype and ``pooled_mask
        [B, ceil(L/N)]`` (mask's dtype): a chunk is valid if it holds a real
        token; the last partial chunk averages only its real tokens; an
        all-padding chunk is zero.
    """
    if chunk_size is None:
        return hidden, mask
    import torch
    import torch.nn.functional as F

    batch, length, dim = hidden.shape
    chunks = math.ceil(length / chunk_size)
    pad = chunks * chunk_size - length
    # Sum in float32 so bf16 states are averaged without extra rounding.
    h = F.pad(hidden.float(), (0, 0, 0, pad)).view(batch, chunks, chunk_size, dim)
    m = F.pad(mask.float(), (0, pad)).view(batch, chunks, chunk_size)
    counts = m.sum(-1)  # [B, C]
    # A select, not a multiply by the mask: a NaN or inf at a padded position
    # (some CUDA attention kernels give them for fully masked rows) must not
    # reach its chunk (NaN * 0 is NaN).
    kept = torch.where(m.unsqueeze(-1) > 0, h, h.new_zeros(()))
    pooled = kept.sum(2) / counts.clamp(min=1).unsqueeze(-1)
    return pooled.to(hidden.dtype), (counts > 0).to(mask.dtype)


def repool(
    states: torch.Tensor, num_tokens: int, chunk_size: int, target: int
) -> torch.Tensor:
    """States pooled at ``chunk_size`` re-pooled exactly to ``target`` (a
    multiple of it): per-request compression of cached or stored states.

    Each coarse chunk is the mean of the fine chunks it covers weighted by
    their valid tokens (``chunk_size`` each, the last one ``num_tokens`` minus
    the rest), which is the mean of its tokens: the same as pooling the encoder
    states at ``target`` directly, up to rounding (fine states already rounded
    to a 16-bit dtype are the difference there).

    Args:
        states: ``[ceil(L / chunk_size), d]`` of one passage.
        num_tokens: ``L``, the passage's valid encoder tokens.
        chunk_size: the pooling factor of ``states``.
        target: the wanted factor, ``chunk_size * 2**k``.
    """
    if target == chunk_size:
        return states
    import torch

    fine = states.shape[0]
    if target % chunk_size or fine != pooled_length(num_tokens, chunk_size):
        raise ValueError(
            f"cannot re-pool {fine} states of chunk {chunk_size} ({num_tokens} "
            f"tokens) to chunk {target}"
        )
    factor = target // chunk_size
    coarse = math.ceil(fine / factor)
    weights = torch.full((coarse * factor,), 0.0, device=states.device)
    weights[:fine] = float(chunk_size)
    weights[fine - 1] = float(num_tokens - (fine - 1) * chunk_size)
    padded = states.new_zeros(coarse * factor, states.shape[1], dtype=torch.float32)
    padded[:fine] = states.float()
    weights = weights.view(coarse, factor, 1)
    summed = (padded.view(coarse, factor, -1) * weights).sum(1)
    return (summed / weights.sum(1)).to(states.dtype)
