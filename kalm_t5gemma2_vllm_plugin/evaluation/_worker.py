# SPDX-License-Identifier: Apache-2.0
"""Runs the numba-backed work (ranx metrics, bm25s) in a helper process.

Why: ranx and bm25s import numba, and once numba's llvmlite is imported, vLLM
0.32 cannot start an engine in that process: the CPU platform's kernel
override scan (``vllm.triton_utils.dispatcher._rebind_kernels``) walks every
module namespace and calls ``vars(x).get`` on llvmlite's library wrapper,
whose ``__dict__`` is not a mapping (``AttributeError: '_lib_fn_wrapper'
object has no attribute 'get'``). Keeping numba out of the caller's process
keeps every later engine start working: a second ``evaluate()``, a test
suite, a notebook.

One helper process per caller process, started on first use and reused; it
speaks JSON lines on its stdin/stdout (floats cross exactly: JSON writes
``repr``), so its results are the ones an in-process call would give.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from kalm_t5gemma2_vllm_plugin.errors import KaLMConfigError, KaLMEngineError

__all__ = ["call"]

_lock = threading.Lock()
_process: subprocess.Popen[str] | None = None


def _start() -> subprocess.Popen[str]:
    package_parent = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (package_parent, env.get("PYTHONPATH")) if p
    )
    process = subprocess.Popen(
        [sys.executable, "-m", __name__],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
        encoding="utf-8",
    )
    atexit.register(_stop, process)
    return process


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def call(function: str, **kwargs: Any) -> Any:
    """``function(**kwargs)`` of ``_FUNCTIONS`` in the helper process."""
    global _process
    with _lock:
        if _process is None or _process.poll() is not None:
            _process = _start()
        assert _process.stdin is not None and _process.stdout is not None
        try:
            _process.stdin.write(
                json.dumps({"call": function, "kwargs": kwargs}) + "\n"
            )
            _process.stdin.flush()
            line = _process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            raise KaLMEngineError(
                f"The evaluation helper process exited (code {_process.poll()}) "
                f"during {function}; its error is above on stderr."
            )
    answer = json.loads(line)
    if "error" in answer:
        kind = (
            KaLMConfigError if answer["type"] == "KaLMConfigError" else KaLMEngineError
        )
        raise kind(answer["error"])
    return answer["result"]


def _functions() -> dict[str, Callable[..., Any]]:
    from kalm_t5gemma2_vllm_plugin.evaluation import first_stage, metrics

    return {
        "bm25_run": first_stage.bm25_run_here,
        "bm25_run_file": first_stage.bm25_run_file_here,
        "evaluate_run": metrics.evaluate_run_here,
        "compare_runs": metrics.compare_runs_here,
    }


def _serve(requests: IO[str], answers: IO[str]) -> None:
    functions = _functions()
    for line in requests:
        request = json.loads(line)
        try:
            answer = {"result": functions[request["call"]](**request["kwargs"])}
        except Exception as exc:  # noqa: BLE001 - sent back to the caller as is
            answer = {
                "error": f"{type(exc).__name__}: {exc}",
                "type": type(exc).__name__,
            }
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


def main() -> None:
    # Answers go on a private copy of stdout; anything else that writes to
    # stdout (a library's print, a C extension) lands on stderr instead.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    _serve(sys.stdin, answers)


if __name__ == "__main__":
    main()
