# SPDX-License-Identifier: Apache-2.0
"""KaLM's maths on Transformers' T5Gemma2 modules, without vLLM.

One home for what the vLLM model and the passage store's encoder share:
building the text encoder and decoder (never the vision tower), mapping
checkpoint tensor names onto them, encoding a batch of passages with
Matryoshka pooling, and scoring a batch of requests with the decoder.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import initialization
from transformers.models.t5gemma2.modeling_t5gemma2 import (
    T5Gemma2Decoder,
    T5Gemma2TextEncoder,
)

from kalm_t5gemma2_vllm_plugin.constants import NO_TOKEN_ID, PAD_TOKEN_ID, YES_TOKEN_ID
from kalm_t5gemma2_vllm_plugin.mep import mep_pool

__all__ = [
    "build_decoder",
    "build_encoder",
    "checkpoint_target",
    "encode_passages",
    "score_requests",
    "text_configs",
]

_SKIPPED_PREFIXES = (
    "lm_head.",  # tied to the embedding; only two rows are ever needed
    "model.decoder.embed_tokens.",  # tied copy of the encoder embedding
    "model.encoder.vision_tower.",
    "model.encoder.multi_modal_projector.",
    "model.encoder.text_model.vision_tower.",
)


def text_configs(config: Any) -> tuple[Any, Any, int]:
    """``(encoder text config, decoder config, eoi id)`` set up for SDPA."""
    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"  # propagates to the sub-configs
    config.is_encoder_decoder = True
    encoder, decoder = config.encoder.text_config, config.decoder
    if encoder.hidden_size != decoder.hidden_size:
        raise ValueError("T5Gemma2 encoder and decoder widths differ.")
    return encoder, decoder, config.eoi_token_index


def build_decoder(config: Any) -> T5Gemma2Decoder:
    """The decoder stack; its embedding is the model's one (tied) table."""
    _, decoder_config, eoi = text_configs(config)
    with initialization.no_init_weights():  # the checkpoint overwrites them
        return T5Gemma2Decoder(decoder_config, eoi).eval()


def build_encoder(
    config: Any, embed_tokens: torch.nn.Module | None = None
) -> T5Gemma2TextEncoder:
    """The text encoder, sharing ``embed_tokens`` when given."""
    encoder_config, _, eoi = text_configs(config)
    with initialization.no_init_weights():
        encoder = T5Gemma2TextEncoder(encoder_config, eoi)
    if embed_tokens is not None:
        encoder.embed_tokens = embed_tokens
    return encoder.eval()


def checkpoint_target(
    name: str, *, encoder_prefix: str | None, embedding: str, decoder_prefix: str | None
) -> str | None:
    """Where a checkpoint tensor goes, or ``None`` when it is not needed.

    Accepts both key layouts: on disk (``model.encoder.layers...``) and the
    in-memory one of Transformers 5 (``model.encoder.text_model.layers...``).
    ``embedding`` names the module holding the shared table; a ``None`` prefix
    skips that stack.
    """
    if name.startswith(_SKIPPED_PREFIXES):
        return None
    if name.startswith("model.decoder."):
        rest = name.removeprefix("model.decoder.")
        return None if decoder_prefix is None else decoder_prefix + rest
    if name.startswith("model.encoder."):
        rest = name.removeprefix("model.encoder.").removeprefix("text_model.")
        if rest.startswith("embed_tokens."):
            return embedding + rest.removeprefix("embed_tokens")
        return None if encoder_prefix is None else encoder_prefix + rest
    return None


@torch.inference_mode()
def encode_passages(
    encoder: T5Gemma2TextEncoder, passages: list[torch.Tensor], chunk_size: int | None
) -> list[torch.Tensor]:
    """Pooled states ``[ceil(L_i / N), d]`` per passage, one padded encoder pass."""
    lengths = torch.tensor([len(p) for p in passages])
    ids = pad_sequence(passages, batch_first=True, padding_value=PAD_TOKEN_ID)
    mask = (torch.arange(ids.shape[1]) < lengths[:, None]).to(ids.device, torch.long)
    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, d]
    pooled, pooled_mask = mep_pool(hidden, mask, chunk_size)
    rows = pooled_mask.sum(1).tolist()  # right padding: valid chunks come first
    return [pooled[i, :n] for i, n in enumerate(rows)]


@torch.inference_mode()
def score_requests(
    decoder: T5Gemma2Decoder,
    passages: list[torch.Tensor],
    prompts: list[torch.Tensor],
    softcap: float | None,
) -> torch.Tensor:
    """Margins ``yes_logit - no_logit`` (float32) for a batch of requests.

    Args:
        decoder: the T5Gemma2 decoder (its embedding is the tied LM head).
        passages: per request, pooled passage states ``[C_i, d]``.
        prompts: per request, decoder prompt ids ``[T_i]`` (CPU).
        softcap: the checkpoint's ``final_logit_softcapping``, if any.
    """
    weight = decoder.embed_tokens.weight
    device, dtype = weight.device, weight.dtype
    num = len(prompts)
    dec_lens = torch.tensor([len(p) for p in prompts])
    dec_ids = pad_sequence(prompts, batch_first=True, padding_value=PAD_TOKEN_ID)
    dec_mask = torch.arange(dec_ids.shape[1]) < dec_lens[:, None]  # [B, T]
    enc_lens = torch.tensor([len(p) for p in passages])
    max_rows = max(1, int(enc_lens.max()))
    states = torch.zeros(num, max_rows, weight.shape[1], dtype=dtype, device=device)
    for i, passage in enumerate(passages):  # [B, C, d], right-padded
        states[i, : len(passage)] = passage
    enc_mask = torch.arange(max_rows) < enc_lens[:, None]  # [B, C]

    hidden = decoder(
        input_ids=dec_ids.to(device),
        attention_mask=dec_mask.to(device, torch.long),
        encoder_hidden_states=states,
        encoder_attention_mask=enc_mask.to(device, torch.long),
    ).last_hidden_state  # [B, T, d]
    last = hidden[torch.arange(num, device=device), (dec_lens - 1).to(device)]
    head = weight[[YES_TOKEN_ID, NO_TOKEN_ID]]  # the tied LM head, two rows
    logits = last.float() @ head.float().T  # [B, 2]
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits[:, 0] - logits[:, 1]
