# SPDX-License-Identifier: Apache-2.0
"""Build a tiny random KaLM checkpoint locally and rank with it on vLLM, offline.

No download is involved; the scores of a random checkpoint mean nothing, but
every step (tokenizer, encoder, pooling, decoder, vLLM scheduling) is real.

    python examples/tiny_checkpoint_rerank.py [OUT_DIR]
"""

import sys
import tempfile

from kalm_t5gemma2_vllm_plugin import KaLMVLLMReranker
from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import make_checkpoint


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="kalm-tiny-")
    path = make_checkpoint(out, "tiny", seed=0)
    documents = [
        "The capital of China is Beijing.",
        "Paris is the capital of France.",
        "Gravity attracts bodies toward one another.",
    ]
    with KaLMVLLMReranker(str(path), dtype="float32") as reranker:
        for hit in reranker.rank("What is the capital of China?", documents):
            print(f"{hit['score']:.6f}  {documents[hit['corpus_id']]}")
        print("engine counters:", reranker.stats())


if __name__ == "__main__":
    main()
