# SPDX-License-Identifier: Apache-2.0
"""The plugin model's configuration: engine-wide KaLM settings, carried to
vLLM's processes through ``hf_overrides`` (and read back there)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kalm_t5gemma2_vllm_plugin.constants import (
    ARCHITECTURE,
    DEFAULT_DOCUMENT_MAX_LENGTH,
    DEFAULT_ENCODER_CHUNK_SIZE,
    DEFAULT_PASSAGE_CACHE_MB,
    DEFAULT_QUERY_MAX_LENGTH,
)
from kalm_t5gemma2_vllm_plugin.errors import KaLMInputError
from kalm_t5gemma2_vllm_plugin.validation import check_positive_int, parse_chunk_size

__all__ = [
    "CHUNK_FIELD",
    "IDS_FIELD",
    "KEY_FIELD",
    "POOL_FIELD",
    "SCORE_IDS_KEY",
    "STATES_CHUNK_FIELD",
    "STATES_FIELD",
    "TOKENS_FIELD",
    "EngineSettings",
]

# --- what crosses from the caller into vLLM's processes ----------------------------
# Passage item keys (multi_modal_data={"passage": ...} and the processor's fields):
#: encoder token ids of the passage
IDS_FIELD = "passage_ids"
#: precomputed pooled states (the passage store)
STATES_FIELD = "passage_states"
#: a score-API prompt, moved there by the model's ``post_process_tokens``
SCORE_IDS_KEY = "score_ids"
#: the passage key (``passage_key.py``) as KEY_BYTES uint8 values; in a stored
#: passage's item, the key as hex
KEY_FIELD = "passage_key"
#: the pooling factor this request wants (per-request compression; default:
#: the engine's); a multiple of the engine's
CHUNK_FIELD = "chunk_size"
#: beside precomputed states: the passage's encoder tokens and the factor the
#: states were pooled with (a store may be finer than the engine)
TOKENS_FIELD = "num_tokens"
STATES_CHUNK_FIELD = "states_chunk_size"
#: processor -> model: int64 ``[states' factor, wanted factor, tokens]``
POOL_FIELD = "passage_pool"

# hf_overrides keys the plugin model reads back (prefixed: HF configs hold other keys).
OVERRIDE_CHUNK_SIZE = "kalm_encoder_chunk_size"
OVERRIDE_DOCUMENT_MAX_LENGTH = "kalm_document_max_length"
OVERRIDE_QUERY_MAX_LENGTH = "kalm_query_max_length"
OVERRIDE_ALLOW_PASSAGE_STATES = "kalm_allow_passage_states"
OVERRIDE_DECODER_ONLY = "kalm_decoder_only"
OVERRIDE_COUNTERS_PATH = "kalm_counters_path"
OVERRIDE_PASSAGE_CACHE_MB = "kalm_passage_cache_mb"


@dataclass(frozen=True)
class EngineSettings:
    """What the plugin model and processor read from the HF config.

    ``chunk_size`` ``None`` means no pooling (the same maths as a factor of 1).
    """

    chunk_size: int | None = DEFAULT_ENCODER_CHUNK_SIZE
    document_max_length: int = DEFAULT_DOCUMENT_MAX_LENGTH
    query_max_length: int = DEFAULT_QUERY_MAX_LENGTH
    #: Accept precomputed pooled states as passages (the passage store); off by
    #: default so no HTTP client can inject tensors.
    allow_passage_states: bool = False
    #: Build no encoder at all: only precomputed passage states are accepted.
    decoder_only: bool = False
    #: File where the model publishes its counters (see ``counters.py``).
    counters_path: str | None = None
    #: Size of the plugin's passage cache in MiB (0: off).
    passage_cache_mb: float = DEFAULT_PASSAGE_CACHE_MB

    def __post_init__(self) -> None:
        # Normalise, not only check: "4" becomes 4, "none" becomes None.
        for name, value in (
            ("chunk_size", parse_chunk_size(self.chunk_size, "encoder_chunk_size")),
            (
                "document_max_length",
                check_positive_int(self.document_max_length, "document_max_length"),
            ),
            (
                "query_max_length",
                check_positive_int(self.query_max_length, "query_max_length"),
            ),
        ):
            object.__setattr__(self, name, value)
        cache = self.passage_cache_mb
        if (
            isinstance(cache, bool)
            or not isinstance(cache, int | float)
            or not cache >= 0  # also refuses NaN
            or cache == float("inf")
        ):
            raise KaLMInputError(
                f"passage_cache_mb must be a number >= 0 (MiB; 0 turns the cache "
                f"off), got {cache!r}.",
                field="passage_cache_mb",
            )
        object.__setattr__(self, "passage_cache_mb", float(cache))

    @property
    def pool_factor(self) -> int:
        """Positions averaged per pooled state (1 when pooling is off)."""
        return self.chunk_size or 1

    def hf_overrides(self) -> dict[str, Any]:
        """``hf_overrides`` that run a T5Gemma2 checkpoint as this plugin's model."""
        return {
            "architectures": [ARCHITECTURE],
            # vLLM must see a decoder-only pooling model; the plugin runs the
            # encoder itself (as a "passage" modality).
            "is_encoder_decoder": False,
            "num_labels": 1,
            OVERRIDE_CHUNK_SIZE: self.chunk_size,
            OVERRIDE_DOCUMENT_MAX_LENGTH: self.document_max_length,
            OVERRIDE_QUERY_MAX_LENGTH: self.query_max_length,
            OVERRIDE_ALLOW_PASSAGE_STATES: self.allow_passage_states,
            OVERRIDE_DECODER_ONLY: self.decoder_only,
            OVERRIDE_COUNTERS_PATH: self.counters_path,
            OVERRIDE_PASSAGE_CACHE_MB: self.passage_cache_mb,
        }

    @classmethod
    def from_hf_config(cls, config: Any) -> EngineSettings:
        """Read the overrides back; absent keys take the defaults."""
        return cls(
            chunk_size=getattr(config, OVERRIDE_CHUNK_SIZE, DEFAULT_ENCODER_CHUNK_SIZE),
            document_max_length=getattr(
                config, OVERRIDE_DOCUMENT_MAX_LENGTH, DEFAULT_DOCUMENT_MAX_LENGTH
            ),
            query_max_length=getattr(
                config, OVERRIDE_QUERY_MAX_LENGTH, DEFAULT_QUERY_MAX_LENGTH
            ),
            allow_passage_states=bool(
                getattr(config, OVERRIDE_ALLOW_PASSAGE_STATES, False)
            ),
            decoder_only=bool(getattr(config, OVERRIDE_DECODER_ONLY, False)),
            counters_path=getattr(config, OVERRIDE_COUNTERS_PATH, None),
            passage_cache_mb=getattr(
                config, OVERRIDE_PASSAGE_CACHE_MB, DEFAULT_PASSAGE_CACHE_MB
            ),
        )
