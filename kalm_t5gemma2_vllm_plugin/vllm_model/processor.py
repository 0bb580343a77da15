# SPDX-License-Identifier: Apache-2.0
"""The ``"passage"`` modality: how a document reaches vLLM's encoder step.

Each request carries one passage. ``apply()`` turns it into encoder ids (or
accepts precomputed pooled states), prepends ``C = ceil(L / N)`` placeholder
ids to the decoder prompt, and keys vLLM's encoder cache by a hash of the
final encoder ids, so a passage recurring across queries and requests is
encoded once, whichever form (text or ids) it arrived in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import torch
from transformers import BatchFeature
from vllm.inputs import MultiModalInput, mm_input
from vllm.multimodal.inputs import (
    MultiModalFieldConfig,
    MultiModalKwargsItems,
    PlaceholderRange,
)
from vllm.multimodal.parse import MultiModalDataParser, ProcessorBatchItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
)
from vllm.multimodal.processing.context import TimingContext
from vllm.multimodal.processing.inputs import ProcessorInputs

from kalm_t5gemma2_vllm_plugin.constants import (
    BOS_TOKEN_ID,
    PASSAGE_MODALITY,
    PLACEHOLDER_TOKEN_ID,
    TEMPLATE_VERSION,
)
from kalm_t5gemma2_vllm_plugin.errors import KaLMInputError
from kalm_t5gemma2_vllm_plugin.mep import pooled_length
from kalm_t5gemma2_vllm_plugin.passage_key import KEY_BYTES, passage_key
from kalm_t5gemma2_vllm_plugin.prompt import decoder_prompt_ids, encode_document
from kalm_t5gemma2_vllm_plugin.validation import (
    check_request_chunk_size,
    parse_chunk_size,
)
from kalm_t5gemma2_vllm_plugin.vllm_model.config import (
    CHUNK_FIELD,
    IDS_FIELD,
    KEY_FIELD,
    POOL_FIELD,
    SCORE_IDS_KEY,
    STATES_CHUNK_FIELD,
    STATES_FIELD,
    TOKENS_FIELD,
    EngineSettings,
)
from kalm_t5gemma2_vllm_plugin.vllm_model.score_template import unpack_score_text

__all__ = [
    "KaLMPassageDummyInputsBuilder",
    "KaLMPassageProcessingInfo",
    "KaLMPassageProcessor",
    "leading_placeholders",
]


def leading_placeholders(ids: torch.Tensor) -> int:
    """Passage rows of a request: the run of placeholder ids that starts it.

    The one place the passage-row protocol is read back (by the pooler); it
    holds because ``apply()`` puts ``C`` placeholders first and refuses decoder
    prompts that start with the placeholder id. At most ``len(ids) - 1``: a
    real request always ends in decoder tokens, and vLLM's dummy runs (Model
    Runner V1's warm-up sends all-zero ids) must still leave the decoder one.
    """
    others = (ids != PLACEHOLDER_TOKEN_ID).nonzero()
    run = int(others[0]) if len(others) else len(ids)
    return max(0, min(run, len(ids) - 1))


def _is_one_item(data: object) -> bool:
    if isinstance(data, (str, Mapping)):
        return True
    return isinstance(data, Sequence) and bool(data) and isinstance(data[0], int)


class PassageItems(ProcessorBatchItems[Any]):
    """Passages as given: text, encoder ids, or a dict (score ids / pooled states)."""

    def __init__(self, data: object) -> None:
        items = [data] if _is_one_item(data) else list(data)  # type: ignore[call-overload]
        super().__init__(items, PASSAGE_MODALITY)


class PassageDataParser(MultiModalDataParser):
    def _get_subparsers(self) -> Mapping[str, Any]:
        return {PASSAGE_MODALITY: PassageItems}


class KaLMPassageProcessingInfo(BaseProcessingInfo):
    @cached_property
    def settings(self) -> EngineSettings:
        return EngineSettings.from_hf_config(self.get_hf_config())

    def get_data_parser(self) -> MultiModalDataParser:
        return PassageDataParser()

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {PASSAGE_MODALITY: 1}

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        # The default builds the checkpoint's HF (Gemma 3 image) processor.
        return {}

    def get_mm_max_tokens_per_item(
        self, seq_len: int, mm_counts: Mapping[str, int]
    ) -> Mapping[str, int]:
        settings = self.settings
        return {
            PASSAGE_MODALITY: pooled_length(
                settings.document_max_length, settings.pool_factor
            )
        }

    def hidden_size(self) -> int:
        return int(self.get_hf_config().decoder.hidden_size)


class KaLMPassageDummyInputsBuilder(BaseDummyInputsBuilder[KaLMPassageProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return ""

    def get_dummy_mm_data(
        self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Any = None
    ) -> Mapping[str, Any]:
        if not mm_counts.get(PASSAGE_MODALITY, 0):
            return {}
        settings = self.info.settings
        if settings.decoder_only:
            rows = pooled_length(settings.document_max_length, settings.pool_factor)
            states = torch.zeros(rows, self.info.hidden_size())
            return {PASSAGE_MODALITY: {STATES_FIELD: states}}
        # A maximum-length passage, as encoder ids.
        return {PASSAGE_MODALITY: [BOS_TOKEN_ID] * settings.document_max_length}


class KaLMPassageProcessor(BaseMultiModalProcessor[KaLMPassageProcessingInfo]):
    def _get_mm_fields_config(
        self, hf_inputs: Any, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            name: MultiModalFieldConfig.batched(PASSAGE_MODALITY)
            for name in (IDS_FIELD, STATES_FIELD, KEY_FIELD, POOL_FIELD)
        }

    def _get_prompt_updates(self, *args: Any, **kwargs: Any) -> Sequence[Any]:
        return []  # apply() below places the placeholders itself

    # Overridden whole: the cache key is a hash of the *final* encoder ids, so a
    # passage given as text or as ids is one cache entry.
    def apply(
        self, inputs: ProcessorInputs, timing_ctx: TimingContext
    ) -> MultiModalInput:
        with timing_ctx.record("kalm_passage"):
            return self._apply(inputs)

    def _apply(self, inputs: ProcessorInputs) -> MultiModalInput:
        settings = self.info.settings
        item = inputs.mm_data_items.get_items(PASSAGE_MODALITY, PassageItems).get(0)
        decoder_ids = list(inputs.prompt)

        if isinstance(item, Mapping) and SCORE_IDS_KEY in item:
            decoder_ids, item = self._unpack_score_prompt(item[SCORE_IDS_KEY])
        # Per-request compression: the model re-pools to this factor.
        target = check_request_chunk_size(
            item.get(CHUNK_FIELD) if isinstance(item, Mapping) else None,
            settings.chunk_size,
            CHUNK_FIELD,
        )
        if isinstance(item, Mapping) and STATES_FIELD in item:
            field, data = STATES_FIELD, self._check_states(item[STATES_FIELD])
            source, tokens = self._states_pooling(
                item, data, target, settings.pool_factor
            )
            num_rows = data.shape[0] if tokens == 0 else pooled_length(tokens, target)
            # A stored passage carries the key of the ids it was encoded from,
            # so it shares its cache entries with the same passage as text.
            key = item.get(KEY_FIELD) or _hash_bytes(
                b"states", data.view(torch.uint8).numpy().tobytes()
            )
            key = self._check_key(key)
        else:
            ids = self._encoder_ids(item)
            field, data = IDS_FIELD, torch.tensor(ids, dtype=torch.long)
            source, tokens = settings.pool_factor, len(ids)
            num_rows = pooled_length(tokens, target)
            key = passage_key(ids, settings.chunk_size)

        # Profiling dummies come with an empty decoder prompt.
        decoder_ids = decoder_ids or [BOS_TOKEN_ID]
        if decoder_ids[0] == PLACEHOLDER_TOKEN_ID:
            raise KaLMInputError(
                f"The decoder prompt must not start with token id "
                f"{PLACEHOLDER_TOKEN_ID} (the passage placeholder); KaLM prompts "
                f"start with <bos>.",
                field="prompt_token_ids",
            )
        key_bytes = torch.tensor(list(bytes.fromhex(key)), dtype=torch.uint8)
        pool = torch.tensor([source, target, tokens], dtype=torch.long)
        mm_kwargs = MultiModalKwargsItems.from_hf_inputs(
            BatchFeature(
                {field: data[None], KEY_FIELD: key_bytes[None], POOL_FIELD: pool[None]}
            ),
            {
                name: MultiModalFieldConfig.batched(PASSAGE_MODALITY)
                for name in (field, KEY_FIELD, POOL_FIELD)
            },
        )
        model_key = f"{self.info.model_id}|{TEMPLATE_VERSION}".encode()
        return mm_input(
            prompt_token_ids=[PLACEHOLDER_TOKEN_ID] * num_rows + decoder_ids,
            mm_kwargs=mm_kwargs,
            # The states vLLM caches are those at the wanted factor.
            mm_hashes={
                PASSAGE_MODALITY: [
                    _hash_bytes(model_key, key.encode(), str(target).encode())
                ]
            },
            mm_placeholders={
                PASSAGE_MODALITY: [PlaceholderRange(offset=0, length=num_rows)]
            },
        )

    @staticmethod
    def _states_pooling(
        item: Mapping[str, Any], states: torch.Tensor, target: int, engine: int
    ) -> tuple[int, int]:
        """``(factor the states were pooled with, the passage's tokens)``;
        tokens 0 when not given (then no re-pooling is possible). Without a
        factor the states are taken as pooled like the engine's."""
        given = item.get(STATES_CHUNK_FIELD, engine)
        source = parse_chunk_size(given, STATES_CHUNK_FIELD) or 1
        tokens = item.get(TOKENS_FIELD)
        if tokens is None:
            if source != target:
                raise KaLMInputError(
                    f"Re-pooling stored states to chunk size {target} needs the "
                    f"passage's token count ({TOKENS_FIELD}).",
                    field=TOKENS_FIELD,
                )
            return source, 0
        if (
            isinstance(tokens, bool)
            or not isinstance(tokens, int)
            or pooled_length(tokens, source) != states.shape[0]
        ):
            raise KaLMInputError(
                f"{TOKENS_FIELD}={tokens!r} does not match {states.shape[0]} states "
                f"pooled at chunk size {source}.",
                field=TOKENS_FIELD,
            )
        if target % source:
            raise KaLMInputError(
                f"States pooled at chunk size {source} cannot be re-pooled to "
                f"{target} (not a multiple).",
                field=CHUNK_FIELD,
            )
        return source, tokens

    def _encoder_ids(self, item: object) -> list[int]:
        settings = self.info.settings
        if settings.decoder_only:
            raise KaLMInputError(
                "This engine runs in decoder-only mode and accepts only passages "
                "from a passage store; it cannot encode text.",
                field="documents",
            )
        if isinstance(item, Mapping) and IDS_FIELD in item:
            item = item[IDS_FIELD]
        if isinstance(item, str):
            ids = encode_document(
                self._tokenizer(), item, settings.document_max_length
            ).ids
        elif isinstance(item, Sequence) and all(isinstance(i, int) for i in item):
            ids = list(item)[: settings.document_max_length]
        else:
            raise KaLMInputError(
                "A passage must be a str (the document), a list of encoder token "
                f"ids, or precomputed states; got {type(item).__name__}.",
                field="passage",
            )
        if not ids:
            raise KaLMInputError(
                "A passage must have at least one encoder token.", field="passage"
            )
        return ids

    def _unpack_score_prompt(self, packed_ids: Sequence[int]) -> tuple[list[int], str]:
        """Rebuild the KaLM prompt from a score-API prompt (``score_template``)."""
        tokenizer = self._tokenizer()
        settings = self.info.settings
        text = tokenizer.decode(
            list(packed_ids),
            skip_special_tokens=False,
            clean_up_tokenization_spaces=False,
        )
        query, instruction, document = unpack_score_text(text)
        kwargs = {"instruction": instruction} if instruction else {}
        decoder_ids = decoder_prompt_ids(
            tokenizer, query, query_max_length=settings.query_max_length, **kwargs
        )
        return decoder_ids, document

    def _tokenizer(self) -> Any:
        # The checkpoint's HF tokenizer; vLLM types it by its own, narrower
        # protocol, the prompt code by the HF calls it makes.
        return self.info.get_tokenizer()

    @staticmethod
    def _check_key(key: object) -> str:
        if not isinstance(key, str) or len(key) != 2 * KEY_BYTES:
            raise KaLMInputError(
                f"A stored passage's key must be {2 * KEY_BYTES} hex digits.",
                field=KEY_FIELD,
            )
        try:
            bytes.fromhex(key)
        except ValueError:
            raise KaLMInputError(
                f"A stored passage's key must be {2 * KEY_BYTES} hex digits.",
                field=KEY_FIELD,
            ) from None
        return key

    def _check_states(self, states: object) -> torch.Tensor:
        settings = self.info.settings
        if not settings.allow_passage_states:
            raise KaLMInputError(
                "Precomputed passage states are accepted only by an engine started "
                "for a passage store (allow_passage_states).",
                field=STATES_FIELD,
            )
        hidden = self.info.hidden_size()
        if (
            not isinstance(states, torch.Tensor)
            or states.dim() != 2
            or states.shape[0] < 1
            or states.shape[1] != hidden
        ):
            raise KaLMInputError(
                f"Passage states must be a tensor of shape [C >= 1, {hidden}].",
                field=STATES_FIELD,
            )
        if not states.is_floating_point() or not torch.isfinite(states).all():
            raise KaLMInputError(
                "Passage states must be finite floating-point values.",
                field=STATES_FIELD,
            )
        return states.contiguous()


def _hash_bytes(*parts: bytes) -> str:
    digest = hashlib.blake2b(digest_size=20)
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()
