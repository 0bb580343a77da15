# SPDX-License-Identifier: Apache-2.0
"""Offline reranking with vLLM: the product description's example.

python examples/offline_rerank.py --model KaLM-Embedding/KaLM-Reranker-V1-Nano
"""

import argparse

from kalm_t5gemma2_vllm_plugin import MODEL_ID, KaLMVLLMReranker

QUERY = "What is the capital of China?"
DOCUMENTS = [
    "The capital of China is Beijing.",
    "Gravity attracts bodies toward one another.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=MODEL_ID)
    parser.add_argument(
        "--dtype", default=None, help="default: bf16 on CUDA, fp32 on CPU"
    )
    args = parser.parse_args()

    with KaLMVLLMReranker(
        args.model, dtype=args.dtype, encoder_chunk_size=4
    ) as reranker:
        # P(yes) per pair, in input order
        print(reranker.predict([(QUERY, doc) for doc in DOCUMENTS]))
        # sorted results; the margin is yes_logit - no_logit
        for hit in reranker.rank(QUERY, DOCUMENTS, return_margin=True):
            print(
                f"{hit['score']:.6f} {hit['margin']:+.4f} {DOCUMENTS[hit['corpus_id']]}"
            )


if __name__ == "__main__":  # vLLM starts worker processes with spawn
    main()
