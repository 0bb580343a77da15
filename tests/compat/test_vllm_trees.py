# SPDX-License-Identifier: Apache-2.0
"""Fetching and unpacking release trees, on small synthetic wheels (no network)."""

from __future__ import annotations

import hashlib
import os
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.compat.vllm_trees import (
    Release,
    TreeUnavailable,
    WheelMismatch,
    python_tree,
)

pytestmark = pytest.mark.compat

MEMBERS = {
    "vllm/__init__.py": "__version__ = '9.9.9'\n",
    "vllm/v1/worker/runner.py": "X = 1\n",
    "vllm/_C.abi3.so": "binary",
    "vllm/configs/table.json": "{}",
    "vllm-9.9.9.dist-info/METADATA": "Name: vllm\n",
    "other/module.py": "Y = 2\n",
}


def _wheel(path: Path, members: dict[str, str]) -> Release:
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return Release("9.9.9", hashlib.sha256(path.read_bytes()).hexdigest())


def _serving(wheel: Path, calls: list[Path]) -> Callable[[Release, Path], Path]:
    """A download that copies ``wheel`` where pip would have saved it."""

    def download(release: Release, dest: Path) -> Path:
        calls.append(dest)
        dest.mkdir(parents=True)
        target = dest / release.wheel_name
        target.write_bytes(wheel.read_bytes())
        return target

    return download


def test_tree_holds_only_the_vllm_python_files(tmp_path: Path) -> None:
    release = _wheel(tmp_path / "w.whl", MEMBERS)
    calls: list[Path] = []
    tree = python_tree(release, tmp_path / "cache", _serving(tmp_path / "w.whl", calls))
    files = sorted(
        str(p.relative_to(tree.path)) for p in tree.path.rglob("*") if p.is_file()
    )
    assert files == [
        ".kalm-compat-tree.json",
        "vllm/__init__.py",
        "vllm/v1/worker/runner.py",
    ]
    assert tree.fetched and len(calls) == 1
    # Nothing else is left in the cache: no wheel, no temporary directory.
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["vllm-9.9.9"]


def test_second_call_uses_the_unpacked_tree(tmp_path: Path) -> None:
    release = _wheel(tmp_path / "w.whl", MEMBERS)
    calls: list[Path] = []
    download = _serving(tmp_path / "w.whl", calls)
    first = python_tree(release, tmp_path / "cache", download)
    second = python_tree(release, tmp_path / "cache", download)
    assert second.path == first.path and not second.fetched
    assert len(calls) == 1


def test_tree_without_marker_is_replaced(tmp_path: Path) -> None:
    """What an interrupted copy or an older layout leaves is never trusted."""
    release = _wheel(tmp_path / "w.whl", MEMBERS)
    half = tmp_path / "cache" / "vllm-9.9.9" / "vllm"
    half.mkdir(parents=True)
    (half / "__init__.py").write_text("half")
    calls: list[Path] = []
    tree = python_tree(release, tmp_path / "cache", _serving(tmp_path / "w.whl", calls))
    assert tree.fetched
    assert (tree.path / "vllm" / "v1" / "worker" / "runner.py").is_file()
    assert (tree.path / "vllm" / "__init__.py").read_text() != "half"


def test_stale_partial_directories_are_removed_young_ones_kept(
    tmp_path: Path,
) -> None:
    release = _wheel(tmp_path / "w.whl", MEMBERS)
    cache = tmp_path / "cache"
    stale, young = cache / ".partial-dead", cache / ".partial-running"
    for partial in (stale, young):
        (partial / "tree").mkdir(parents=True)
    an_hour_ago = time.time() - 3601
    os.utime(stale, (an_hour_ago, an_hour_ago))
    python_tree(release, cache, _serving(tmp_path / "w.whl", []))
    assert not stale.exists()
    assert young.exists()  # may belong to a concurrent run


def test_wheel_with_another_sha256_is_refused(tmp_path: Path) -> None:
    release = _wheel(tmp_path / "w.whl", MEMBERS)
    pinned = Release(release.version, "0" * 64)
    with pytest.raises(WheelMismatch, match="pinned 0000"):
        python_tree(pinned, tmp_path / "cache", _serving(tmp_path / "w.whl", []))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []


def test_member_escaping_the_tree_is_refused(tmp_path: Path) -> None:
    release = _wheel(tmp_path / "w.whl", {**MEMBERS, "vllm/../escape.py": "Z = 3\n"})
    with pytest.raises(WheelMismatch, match="unsafe path"):
        python_tree(release, tmp_path / "cache", _serving(tmp_path / "w.whl", []))
    assert not (tmp_path / "cache" / "vllm-9.9.9").exists()
    assert not list(tmp_path.rglob("escape.py"))


def test_failed_download_leaves_nothing_behind(tmp_path: Path) -> None:
    def offline(release: Release, dest: Path) -> Path:
        raise TreeUnavailable("pip download vllm==9.9.9 failed: no network")

    with pytest.raises(TreeUnavailable, match="no network"):
        python_tree(Release("9.9.9", "0" * 64), tmp_path / "cache", offline)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []
