# SPDX-License-Identifier: Apache-2.0
"""What every client script shares: the spec on stdin, one JSON report written
to the path in ``argv[1]`` (not stdout: some libraries print there).

The scripts run in the client family's own venv (``tests/clients/venvs.py``),
never in the engine's, so they import nothing from this project.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from importlib.metadata import version
from typing import Any

Ranks = Iterable[tuple[Any, Any]]


class Report:
    """Each case's ``(index, score)`` list in the client's own order, or the
    error the client raised; the test compares them with the server's."""

    def __init__(self, packages: list[str]) -> None:
        self.spec: dict[str, Any] = json.load(sys.stdin)
        self.versions = {p: version(p) for p in packages}
        self.cases: dict[str, Any] = {}

    def run(self, name: str, call: Callable[[], Ranks]) -> None:
        self.run_each([name], lambda: [call()])

    def run_each(self, names: list[str], call: Callable[[], list[Ranks]]) -> None:
        """One call answering several cases (concurrent requests)."""
        try:
            answers = [[[int(i), float(s)] for i, s in ranks] for ranks in call()]
        except Exception as exc:  # reported, so that one case never hides another
            status = getattr(exc, "status_code", None)
            error = {
                "type": type(exc).__name__,
                "status": status if isinstance(status, int) else None,
                "message": str(exc)[:4000],
            }
            self.cases.update({name: {"error": error} for name in names})
        else:
            assert len(answers) == len(names), (names, len(answers))
            self.cases.update(
                {name: {"ranks": r} for name, r in zip(names, answers, strict=True)}
            )

    def emit(self) -> None:
        with open(sys.argv[1], "w", encoding="utf-8") as out:
            json.dump({"versions": self.versions, "cases": self.cases}, out)
