# SPDX-License-Identifier: Apache-2.0
"""The encoder's per-pass token cap (``ENCODER_BATCH_TOKENS``) at L = 1,024.

The sweep's L = 1,024 section (100 new passages of 1,024 tokens, cold once, then
warm once) through the plugin, once with the shipped cap (8,192 padded tokens per
encoder pass) and once with no cap (whatever the scheduler hands over in one
step: up to ~25 passages), each engine in its own worker process as the
benchmark runs them; then the reference on 16 pairs of the same workload.
Reports pairs/s of both passes and the peak RSS of each process.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/encoder_batch.py --dtype float32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from kalm_t5gemma2_vllm_plugin.bench import DEFAULT_WORKDIR
from kalm_t5gemma2_vllm_plugin.bench.sweep import SweepShape
from kalm_t5gemma2_vllm_plugin.bench.worker import RESULT_PREFIX

# Runs the benchmark worker with the model module's cap replaced first (the
# engine is in-process in a worker, so the patch reaches the model).
_PATCHED = (
    "import sys, kalm_t5gemma2_vllm_plugin.vllm_model.model as m;"
    "m.ENCODER_BATCH_TOKENS = int(sys.argv.pop(1));"
    "from kalm_t5gemma2_vllm_plugin.bench.worker import main; main()"
)


def _worker(config: dict, cap: int | None) -> dict:
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_LOGGING_LEVEL": "WARNING",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if cap is None:
        command = [sys.executable, "-m", "kalm_t5gemma2_vllm_plugin.bench.worker"]
    else:
        command = [sys.executable, "-c", _PATCHED, str(cap)]
    done = subprocess.run(
        [*command, json.dumps(config)], env=env, capture_output=True, text=True
    )
    lines = [x for x in done.stdout.splitlines() if x.startswith(RESULT_PREFIX)]
    if done.returncode or not lines:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--documents", type=int, default=100)
    args = parser.parse_args()
    shape = SweepShape(long_documents=args.documents)
    pool = replace(shape.pool_for(shape.long_documents, 1024), queries=1)
    checkpoint = str(Path(DEFAULT_WORKDIR) / "kalm-nano-seed0")
    base = {"dtype": args.dtype, "chunk_size": 4, "checkpoint": checkpoint}
    print(f"L=1024, D={args.documents}, Q=1 cold then 1 warm, {args.dtype}")
    for label, cap in (("cap 8,192 (shipped)", None), ("no cap", 1 << 30)):
        r = _worker(
            {
                **base,
                "engine": "pool-plugin",
                "pool": pool.as_dict(),
                "warm_queries": 1,
            },
            cap,
        )
        print(
            f"plugin, {label}: cold {r['first_pass']['pairs_per_s']:.3f} pairs/s, "
            f"warm {r['warm_pass']['pairs_per_s']:.2f} pairs/s, "
            f"peak RSS {r['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    r = _worker(
        {**base, "engine": "pool-reference", "pool": pool.as_dict(), "peer_pairs": 16},
        None,
    )
    print(
        f"reference, 16 pairs: {r['subset_pass']['pairs_per_s']:.3f} pairs/s, "
        f"peak RSS {r['peak_rss_mb']:.0f} MB"
    )


if __name__ == "__main__":
    main()
