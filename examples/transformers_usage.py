# SPDX-License-Identifier: Apache-2.0
"""The model card's "Using transformers" example: the plain reference reranker.

python examples/transformers_usage.py --model KaLM-Embedding/KaLM-Reranker-V1-Nano
"""

import argparse

from kalm_t5gemma2_vllm_plugin.constants import MODEL_ID, SAMPLE_DOCUMENTS, SAMPLE_QUERY
from kalm_t5gemma2_vllm_plugin.rerankers.reference import KaLMReranker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=MODEL_ID)
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "bf16", "float16", "fp16", "float32", "fp32"],
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--query-max-length", type=int, default=512)
    parser.add_argument("--reranker-max-length", type=int, default=1024)
    parser.add_argument("--chunk-size", default="4", help="N or 'none'")
    args = parser.parse_args()

    reranker = KaLMReranker(
        args.model,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        query_max_length=args.query_max_length,
        max_length=args.reranker_max_length,
        chunk_size=args.chunk_size,
    )
    pairs = [(SAMPLE_QUERY, doc) for doc in SAMPLE_DOCUMENTS]
    print("scores:", reranker.predict(pairs))
    for result in reranker.rank(
        SAMPLE_QUERY, list(SAMPLE_DOCUMENTS), return_margin=True
    ):
        print(result, SAMPLE_DOCUMENTS[result["corpus_id"]])


if __name__ == "__main__":
    main()
