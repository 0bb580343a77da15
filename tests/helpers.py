# SPDX-License-Identifier: Apache-2.0
"""Tolerances and inputs shared by the tests."""

from __future__ import annotations

from kalm_t5gemma2_vllm_plugin.testing import synthetic_text

#: Largest |margin difference| tolerated between any score path and the
#: reference on the same checkpoint, in float32.
MARGIN_ATOL = 1e-4
#: Scores of the same pair computed alone or inside a mixed batch.
BATCH_ATOL = 1e-5

QUERY = "What is the capital of China?"


def fidelity_documents() -> dict[str, str]:
    """Documents covering the edge cases every score path must get right."""
    return {
        "one-token": "x",
        "empty": "",
        "short": "The capital of China is Beijing.",
        "beyond-window": synthetic_text(40, seed=1),
        "many-tokens": synthetic_text(150, seed=2),
        "beyond-max-length": synthetic_text(400, seed=3),
        "unicode": "北京是中国的首都。Ελληνικά, emoji 🙂, naïve café — ok",
    }
