# SPDX-License-Identifier: Apache-2.0
"""The compat tier runs only when asked for, and reports its wall time.

A plain ``pytest`` collects this directory but skips it: the tier downloads two
vLLM wheels (575 MB) on a cold cache. It runs when the ``-m`` expression names
``compat`` (``pytest -m compat tests/compat``) or when ``KALM_COMPAT=1``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable

import pytest

_TIMINGS = pytest.StashKey[list[str]]()
_STARTED = pytest.StashKey[float]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_TIMINGS] = []
    config.stash[_STARTED] = time.monotonic()


def _requested(config: pytest.Config) -> bool:
    # Any -m expression that still selected these tests and names the marker
    # asked for them; "not compat" deselects them before this point.
    markexpr = config.getoption("markexpr") or ""
    return (
        bool(re.search(r"\bcompat\b", markexpr)) or os.environ.get("KALM_COMPAT") == "1"
    )


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    if _requested(config):
        return
    skip = pytest.mark.skip(reason="compat tier: run with -m compat or KALM_COMPAT=1")
    for item in items:
        if item.get_closest_marker("compat"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def compat_timing(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Record one line for the end-of-run summary."""
    return request.config.stash[_TIMINGS].append


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = terminalreporter.config.stash[_TIMINGS]
    if not lines:
        return
    wall = time.monotonic() - terminalreporter.config.stash[_STARTED]
    terminalreporter.section("compat tier")
    for line in lines:
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"wall time of the run: {wall:.1f} s")
