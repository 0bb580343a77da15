# SPDX-License-Identifier: Apache-2.0
"""``kalm-vllm-bench``: the benchmark harness (``bench/``) from the command line."""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kalm-vllm-bench``."""
    from kalm_t5gemma2_vllm_plugin.bench import run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
