# SPDX-License-Identifier: Apache-2.0
"""A writer process for the concurrency tests: appends batches of synthetic
passages to a Lance store and prints each committed batch's ids.

``python -m tests.store.lance_writer URI PREFIX BATCHES START_AT [OPTIONS_JSON]``
"""

from __future__ import annotations

import json
import sys
import time

import torch

from kalm_t5gemma2_vllm_plugin.store.format import PassageRecord, StoreIdentity
from kalm_t5gemma2_vllm_plugin.store.lance import LanceStoreWriter

IDENTITY = StoreIdentity("f" * 32, 4, 1024, "kalm-v1", "float32")
HIDDEN = 16
DOCUMENTS_PER_BATCH = 4


def synthetic(
    doc_id: str, windows: int, seed: int
) -> list[tuple[PassageRecord, torch.Tensor]]:
    """One document's windows with seeded states."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            PassageRecord(
                doc_id,
                "0" * 64,
                2,
                8,
                False,
                f"key-{doc_id}",
                window=k,
                windows=windows,
            ),
            torch.randn(2, HIDDEN, generator=generator),
        )
        for k in range(windows)
    ]


def main(argv: list[str]) -> int:
    uri, prefix, batches, start_at = argv[0], argv[1], int(argv[2]), float(argv[3])
    options = json.loads(argv[4]) if len(argv) > 4 else None
    writer = LanceStoreWriter(uri, IDENTITY, storage_options=options)
    time.sleep(max(0.0, start_at - time.time()))  # both writers start together
    for b in range(batches):
        ids = [f"{prefix}-{b}-{d}" for d in range(DOCUMENTS_PER_BATCH)]
        items = [row for i, doc_id in enumerate(ids) for row in synthetic(doc_id, 2, i)]
        writer.write(items)
        print(json.dumps(ids), flush=True)
    writer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
