# SPDX-License-Identifier: Apache-2.0
"""The clients tier's venvs (opt-in: ``OPT_IN_TIERS`` in tests/conftest.py).

On a cold cache the tier first installs six client venvs (111 s measured, no
pip cache). With ``CI=true`` a venv that cannot be installed fails the tier;
elsewhere its tests are skipped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.clients.venvs import VenvUnavailable, ensure_all, how_long

#: The client families of the tier (the venvs' ``schemathesis`` is the fuzz tier's).
CLIENT_FAMILIES = [
    "cohere",
    "langchain",
    "llamaindex",
    "haystack",
    "litellm",
    "rerankers",
]


@pytest.fixture(scope="session")
def client_pythons(tier_timing: Callable[[str], None]) -> dict[str, Path | str]:
    """Each family's venv python, or why it could not be installed; all are
    installed first, so the time of the slow first install is one number."""
    started = time.monotonic()
    results = ensure_all(CLIENT_FAMILIES)
    pythons: dict[str, Path | str] = {}
    for name, result in results.items():
        if isinstance(result, VenvUnavailable):
            pythons[name] = str(result)
            tier_timing(f"{name}: could not be installed")
        else:
            pythons[name] = result[0]
            tier_timing(f"{name}: venv {how_long(result[1])}")
    tier_timing(f"client venvs ready in {time.monotonic() - started:.1f} s")
    return pythons


def venv_python(pythons: dict[str, Path | str], family: str) -> Path:
    """The family's python; without it the test fails in CI, else it skips."""
    python = pythons[family]
    if isinstance(python, Path):
        return python
    message = f"the {family} client venv could not be installed: {python}"
    if os.environ.get("CI", "").lower() in ("1", "true"):
        pytest.fail(message)
    pytest.skip(message)
