# SPDX-License-Identifier: Apache-2.0
"""``kalm-vllm-encode --ray`` throughput on this machine: 1 actor x N threads
vs N actors x 1 thread.

64 passages of 256 tokens, the Nano-dims checkpoint, fp32, into a fresh local
Lance store per run, one local Ray instance for both. Reports passages/s over
the whole call (actor start and model load included, as a run pays them) and
over the encoding alone (from the first commit to the last).

    .venv/bin/python benchmarks/ray_encode.py --cpus 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import synthetic_text
from kalm_t5gemma2_vllm_plugin.store.format import StoreIdentity
from kalm_t5gemma2_vllm_plugin.store.ray_encode import encode_corpus_ray

NANO = Path.home() / ".cache/kalm_t5gemma2_vllm_plugin/bench/kalm-nano-seed0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=NANO)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--passages", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()

    import lance
    import ray
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    identity = StoreIdentity.for_engine(str(args.model), 4, 1024, "float32")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        with corpus.open("w") as f:
            for i in range(args.passages):
                text = synthetic_text(args.tokens, seed=i)
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                text = tokenizer.decode(ids[: args.tokens])
                f.write(json.dumps({"id": f"p{i}", "text": text}) + "\n")
        for workers in (1, args.cpus):
            store = str(Path(tmp) / f"w{workers}.lance")
            start = time.perf_counter()
            counts = encode_corpus_ray(
                None,
                str(args.model),
                str(corpus),
                store,
                identity=identity,
                chunk_size=4,
                document_max_length=1024,
                dtype="float32",
                batch_size=8,
                commit_every=8,
                workers=workers,
            )
            wall = time.perf_counter() - start
            stamps = sorted(
                v["timestamp"].timestamp() for v in lance.dataset(store).versions()
            )[2:]  # after the create and index versions: one per commit
            encode = stamps[-1] - stamps[0]
            commits_after_first = counts["commits"] - 1
            steady = commits_after_first * 8 / encode if encode > 0 else float("nan")
            print(
                json.dumps(
                    {
                        "workers": workers,
                        "threads_per_worker": args.cpus // workers,
                        "passages": counts["encoded"],
                        "tokens": args.tokens,
                        "wall_s": round(wall, 2),
                        "passages_per_s_wall": round(counts["encoded"] / wall, 1),
                        "passages_per_s_steady": round(steady, 1),
                        "commits": counts["commits"],
                    }
                ),
                flush=True,
            )
    ray.shutdown()


if __name__ == "__main__":
    main()
