# SPDX-License-Identifier: Apache-2.0
"""A store is absent or complete to every reader, never half-created."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from kalm_t5gemma2_vllm_plugin.errors import KaLMConfigError
from kalm_t5gemma2_vllm_plugin.store.format import PassageStore, StoreIdentity

IDENTITY = StoreIdentity("f" * 32, 4, 1024, "kalm-v1", "float32")

_CREATOR = """
import sys
from pathlib import Path
from kalm_t5gemma2_vllm_plugin.store.format import PassageStoreWriter, StoreIdentity
identity = StoreIdentity("f" * 32, 4, 1024, "kalm-v1", "float32")
root = Path(sys.argv[1])
for i in range(int(sys.argv[2])):
    PassageStoreWriter(root / f"s{i}", identity).close()
print("done", flush=True)
"""


def test_a_reader_racing_the_creator_sees_no_store_or_a_complete_one(
    tmp_path: Path,
) -> None:
    """Readers poll each store while another process creates it: every open
    either fails with a KaLMConfigError saying there is no store (yet), or
    gives the full identity; never a raw SQLite error."""
    stores = 60
    creator = subprocess.Popen(
        [sys.executable, "-c", _CREATOR, str(tmp_path), str(stores)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    refused = opened = 0
    deadline = time.monotonic() + 120
    try:
        for i in range(stores):
            path = tmp_path / f"s{i}"
            while time.monotonic() < deadline:
                try:
                    reader = PassageStore(path, expected=IDENTITY)
                except KaLMConfigError as error:
                    message = str(error)
                    assert "No passage store" in message or "being created" in message
                    refused += 1
                    continue
                assert reader.identity == IDENTITY and len(reader) == 0
                reader.close()
                opened += 1
                break
    finally:
        out, err = creator.communicate(timeout=120)
    assert creator.returncode == 0, err
    assert opened == stores
    print(f"{opened} stores opened, {refused} opens refused while absent/creating")


def test_a_store_whose_creator_died_reads_as_being_created(tmp_path: Path) -> None:
    """The state a creator killed before its first commit leaves behind."""
    from kalm_t5gemma2_vllm_plugin.store.format import PassageStoreWriter

    root = tmp_path / "store"
    PassageStoreWriter(root, IDENTITY).close()
    (root / "index.sqlite").rename(root / "index.sqlite.creating")
    with pytest.raises(KaLMConfigError, match="being created") as error:
        PassageStore(root)
    assert "run kalm-vllm-encode again" in str(error.value)
    # the next writer finishes the job: the leftover is replaced, not trusted
    PassageStoreWriter(root, IDENTITY).close()
    assert not (root / "index.sqlite.creating").exists()
    assert PassageStore(root, expected=IDENTITY).identity == IDENTITY


def test_a_file_that_is_not_a_store_index_is_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    (root / "index.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(KaLMConfigError, match="not a readable passage store"):
        PassageStore(root)
