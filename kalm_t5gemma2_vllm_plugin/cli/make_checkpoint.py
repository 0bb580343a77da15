# SPDX-License-Identifier: Apache-2.0
"""``kalm-vllm-make-checkpoint``: a random KaLM-shaped checkpoint (no download)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import PRESETS, make_checkpoint

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``kalm-vllm-make-checkpoint PATH [--preset ...] [--seed N] [--dtype ...]``."""
    parser = argparse.ArgumentParser(
        prog="kalm-vllm-make-checkpoint",
        description="Write a random KaLM-Reranker-V1-shaped checkpoint (no download).",
    )
    parser.add_argument("path", help="output directory")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"],
        default=None,
        help="stored dtype (default: float32 for tiny, bfloat16 otherwise)",
    )
    args = parser.parse_args(argv)
    out = make_checkpoint(args.path, args.preset, seed=args.seed, dtype=args.dtype)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
