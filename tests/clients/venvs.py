# SPDX-License-Identifier: Apache-2.0
"""One virtual environment per client family, pinned, in the user cache.

The client libraries only speak HTTP to the server, and their dependency pins
(cohere<6, pydantic, httpx, ...) must never touch the engine's venv. So each
family gets its own venv, ``$XDG_CACHE_HOME/kalm-vllm-clients/<family>-<version>``
(``~/.cache`` by default; ``KALM_CLIENTS_CACHE`` overrides the root), created with
``python3.11 -m venv`` and ``pip install`` of the pins below, and reused while
its marker names the same pins. The marker is written last, so a venv whose
install died is rebuilt, never used.

Install all of them (and print the time each took)::

    .venv/bin/python -m tests.clients.venvs            # or name families
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "FAMILIES",
    "Family",
    "VenvUnavailable",
    "cache_root",
    "ensure_all",
    "ensure_venv",
    "how_long",
]

_MARKER = ".kalm-client-venv.json"
_PIP_TIMEOUT_S = 900


@dataclass(frozen=True)
class Family:
    name: str
    #: The first pin names the venv directory (its version).
    pins: tuple[str, ...]

    @property
    def directory(self) -> str:
        return f"{self.name}-{self.pins[0].split('==', 1)[1]}"


# The versions of ../shared/notes/clients.md (langchain-cohere 0.6.0 caps
# cohere below 6, hence 5.21.1 in that family).
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("cohere", ("cohere==7.3.1",)),
        Family(
            "langchain",
            (
                "langchain-cohere==0.6.0",
                "langchain-community==0.4.2",
                "langchain-classic==1.0.8",
                "langchain-core==1.8.3",
                "cohere==5.21.1",
            ),
        ),
        Family(
            "llamaindex",
            (
                "llama-index-core==0.14.25",
                "llama-index-postprocessor-cohere-rerank==0.10.0",
                "llama-index-postprocessor-jinaai-rerank==0.6.0",
                "llama-index-postprocessor-tei-rerank==0.6.0",
            ),
        ),
        Family(
            "haystack",
            (
                "haystack-ai==3.4.1",
                "cohere-haystack==11.0.0",
                "jina-haystack==2.0.1",
                "huggingface-api-haystack==3.1.0",
            ),
        ),
        Family("litellm", ("litellm==1.110.2",)),
        Family("rerankers", ("rerankers[api]==0.10.0",)),
        # Not a client: the fuzz tier's schema fuzzer, kept apart the same way.
        Family("schemathesis", ("schemathesis==4.32.5",)),
    )
}


class VenvUnavailable(RuntimeError):
    """The venv could not be created or its pins installed (network, pip)."""


def cache_root() -> Path:
    root = os.environ.get("KALM_CLIENTS_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kalm-vllm-clients"


def _base_python() -> str:
    # The venv module of a venv's interpreter builds on its base interpreter.
    return shutil.which("python3.11") or sys.executable


def _ready(path: Path, family: Family) -> bool:
    try:
        marker = json.loads((path / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("pins") == list(family.pins) and (path / "bin/python").exists()


def _run(command: list[str], log: Path) -> None:
    with log.open("ab") as out:
        try:
            done = subprocess.run(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=_PIP_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise VenvUnavailable(
                f"{command[2:5]} ran past {_PIP_TIMEOUT_S} s"
            ) from exc
    if done.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
        raise VenvUnavailable(f"{' '.join(command[:5])} ... failed:\n{tail}")


def ensure_venv(name: str) -> tuple[Path, float]:
    """The family's venv python and the seconds spent installing (0 if reused).

    Processes that want the same venv wait on a lock; the first builds it.
    """
    family = FAMILIES[name]
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    path = root / family.directory
    with (root / f"{family.directory}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _ready(path, family):
            return path / "bin/python", 0.0
        started = time.monotonic()
        shutil.rmtree(path, ignore_errors=True)
        log = root / f"{family.directory}.log"
        log.write_bytes(b"")
        _run([_base_python(), "-m", "venv", str(path)], log)
        pip = [str(path / "bin/python"), "-m", "pip", "install", "--no-input"]
        _run([*pip, "--disable-pip-version-check", *family.pins], log)
        (path / _MARKER).write_text(
            json.dumps({"pins": list(family.pins)}), encoding="utf-8"
        )
        return path / "bin/python", time.monotonic() - started


def ensure_all(
    names: list[str] | None = None, workers: int = 3
) -> dict[str, tuple[Path, float] | VenvUnavailable]:
    """Every named family (all by default), a few installs at a time (pip is
    mostly waiting on downloads and disk)."""
    names = list(FAMILIES) if names is None else names
    results: dict[str, tuple[Path, float] | VenvUnavailable] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(ensure_venv, n): n for n in names}
        for future in concurrent.futures.as_completed(futures):
            try:
                results[futures[future]] = future.result()
            except VenvUnavailable as exc:
                results[futures[future]] = exc
    return {n: results[n] for n in names}


def how_long(seconds: float) -> str:
    """What ``ensure_venv``'s seconds mean, for a report line."""
    return f"installed in {seconds:.1f} s" if seconds else "reused"


def main(argv: list[str] | None = None) -> int:
    names = (sys.argv[1:] if argv is None else argv) or None
    started = time.monotonic()
    failed = 0
    for name, result in ensure_all(names).items():
        if isinstance(result, VenvUnavailable):
            failed += 1
            print(f"{name}: FAILED: {result}", file=sys.stderr)
        else:
            python, seconds = result
            print(f"{name}: {how_long(seconds)} ({python.parent.parent})")
    print(f"client venvs: {time.monotonic() - started:.1f} s wall")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
