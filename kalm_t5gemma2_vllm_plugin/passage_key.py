# SPDX-License-Identifier: Apache-2.0
"""A passage's identity: a hash of its final encoder ids and the chunk size.

Every tier that holds pooled passage states keys them by this (vLLM's encoder
cache through the processor's ``mm_hash``, the plugin's passage cache, the
passage store's rows), so the same passage given as text, as ids or by store
id is one entry everywhere. The template version is mixed in: a change of the
prompt or pooling rules changes every key.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence

from kalm_t5gemma2_vllm_plugin.constants import TEMPLATE_VERSION

__all__ = ["KEY_BYTES", "passage_key"]

#: Digest size; the key travels to the model as this many uint8 values.
KEY_BYTES = 20


def passage_key(encoder_ids: Sequence[int], chunk_size: int | None) -> str:
    """Hex key of a passage: its encoder ids (after truncation) and pooling."""
    digest = hashlib.blake2b(digest_size=KEY_BYTES, person=b"kalm-passage")
    digest.update(f"{TEMPLATE_VERSION}|{chunk_size or 1}|".encode())
    ids = array("i", encoder_ids)  # int32
    if sys.byteorder == "big":  # keys are the same on every machine
        ids.byteswap()
    digest.update(ids.tobytes())
    return digest.hexdigest()
