#!/usr/bin/env bash
# Start kalm-vllm-serve with settings from the environment (defaults shown).
#   MODEL=/path/or/hub-id PORT=8000 examples/start_online_server.sh
# Then: kalm-vllm-client --health; kalm-vllm-client --json-file examples/rerank_request.json
set -euo pipefail
export VLLM_PLUGINS="${VLLM_PLUGINS:-kalm_t5gemma2}"
args=(
  --host "${HOST:-127.0.0.1}"
  --port "${PORT:-8000}"
  --model "${MODEL:-KaLM-Embedding/KaLM-Reranker-V1-Nano}"
  --query-max-length "${QUERY_MAX_LENGTH:-512}"
  --document-max-length "${DOCUMENT_MAX_LENGTH:-1024}"
  --encoder-chunk-size "${ENCODER_CHUNK_SIZE:-4}"
  --max-model-len "${MAX_MODEL_LEN:-2048}"
  --batch-size "${BATCH_SIZE:-32}"
  --log-level "${LOG_LEVEL:-info}"
)
[ -n "${DTYPE:-}" ] && args+=(--dtype "$DTYPE")                      # default: bf16 on CUDA, fp32 on CPU
[ -n "${GPU_MEMORY_UTILIZATION:-}" ] && args+=(--gpu-memory-utilization "$GPU_MEMORY_UTILIZATION")
[ -n "${ALLOWED_ORIGINS:-}" ] && args+=(--allowed-origins "$ALLOWED_ORIGINS")  # CORS, comma-separated
# The API key, if any, is read from KALM_API_KEY (kept out of the process list).
exec "$(dirname "$0")/../.venv/bin/kalm-vllm-serve" "${args[@]}"
