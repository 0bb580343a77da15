# SPDX-License-Identifier: Apache-2.0
"""Identity, the Gemma token ids the model depends on, and numeric defaults."""

from __future__ import annotations

# --- identity -------------------------------------------------------------------
PLUGIN_NAME = "kalm_t5gemma2"
#: Architecture the plugin registers with vLLM (never T5Gemma2ForConditionalGeneration).
ARCHITECTURE = "KaLMT5Gemma2Reranker"
MODEL_ID = "KaLM-Embedding/KaLM-Reranker-V1-Nano"
#: The custom vLLM modality that carries the document to the encoder.
PASSAGE_MODALITY = "passage"
#: Bumped whenever the prompt, truncation or pooling rules change (store keys use it).
TEMPLATE_VERSION = "kalm-v1"

# --- Gemma 3 token ids the model depends on ---------------------------------------
PAD_TOKEN_ID = 0
EOS_TOKEN_ID = 1
BOS_TOKEN_ID = 2
UNK_TOKEN_ID = 3
START_OF_TURN_TOKEN_ID = 105
END_OF_TURN_TOKEN_ID = 106
YES_TOKEN_ID = 4443
NO_TOKEN_ID = 1904
#: Prompt id of the rows that carry pooled passage states inside vLLM. A KaLM
#: decoder prompt starts with <bos>, so the leading run of it is the passage.
PLACEHOLDER_TOKEN_ID = PAD_TOKEN_ID
YES_TOKEN = "yes"
NO_TOKEN = "no"

# --- prompt ------------------------------------------------------------------------
DEFAULT_SYSTEM_INSTRUCTION = (
    "Judge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".'
)
DEFAULT_INSTRUCTION = "Given a query, retrieve documents that answer the query."

# --- defaults ----------------------------------------------------------------------
DEFAULT_QUERY_MAX_LENGTH = 512
DEFAULT_DOCUMENT_MAX_LENGTH = 1024
DEFAULT_ENCODER_CHUNK_SIZE = 4
DEFAULT_BATCH_SIZE = 32
DEFAULT_GPU_MEMORY_UTILIZATION = 0.85
#: The plugin's passage cache: 1 GiB holds the pooled states of 100 candidates
#: of 1,024 tokens at chunk 4 for the Large model in fp32 four times over
#: (256 rows x 2,560 x 4 B = 2.6 MB each), and ~1,600 of them for Nano.
DEFAULT_PASSAGE_CACHE_MB = 1024.0
DECODER_PAD_TO_MULTIPLE_OF = 8
#: Seconds between checks for a newer version of a Lance passage store: how
#: stale a replica may be after an encoding run appends passages.
DEFAULT_STORE_REFRESH_S = 30.0
SUPPORTED_ENCODER_CHUNK_SIZES = (1, 2, 4, 8, 16, 32)

# --- HTTP connections (kalm-vllm-serve) ---------------------------------------------
#: Request line plus headers, in bytes: 4x what browsers and SDKs send at most.
DEFAULT_HTTP_MAX_HEADER_BYTES = 64 * 1024
#: Seconds a request (line, headers, body) may take to arrive: a 32 MiB body
#: needs ~0.6 MB/s.
DEFAULT_HTTP_READ_TIMEOUT = 60.0
#: uvicorn's default: seconds an idle keep-alive connection stays open.
DEFAULT_HTTP_KEEP_ALIVE = 5

# --- sample (model card) -------------------------------------------------------------
SAMPLE_QUERY = "What is the capital of China?"
SAMPLE_DOCUMENTS = (
    "The capital of China is Beijing.",
    "Gravity attracts bodies toward one another.",
)

# --- environment variables -----------------------------------------------------------
ENV_API_KEY = "KALM_API_KEY"
