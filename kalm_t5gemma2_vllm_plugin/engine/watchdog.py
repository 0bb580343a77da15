# SPDX-License-Identifier: Apache-2.0
"""The engine's processes die with the process that started them.

``EngineSession.start`` runs an ``EngineWatchdog`` around the engine start;
``EngineSession.close`` stops it.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["EngineWatchdog"]


def _children(pid: int) -> set[int]:
    """Child pids of ``pid`` (every thread's), from /proc."""
    found: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            found.update(
                int(c)
                for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()
            )
        except OSError:
            pass
    return found


class EngineWatchdog:
    """Stops the processes an engine start spawned when this process dies
    without closing the engine (a SIGKILL, the OOM killer).

    vLLM 0.32 gives its engine core no parent-death watch (only its workers
    watch the core, through a pipe), so a killed front end left
    ``VLLM::EngineCore`` running. This helper, a small process of its own,
    notes the children this process gains while the engine starts and polls
    its own parent; once that is gone it sends them SIGTERM (vLLM's engine
    shutdown), then SIGKILL after ``grace`` seconds, through pidfds (no stray
    kill after pid reuse). Not ``PR_SET_PDEATHSIG``: that fires when the
    *thread* that spawned the child exits (engines start in worker threads),
    and vLLM spawns its core with no hook to set it. Linux only; not used with
    an in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``).
    """

    GRACE_SECONDS = 5.0
    #: How often the watchdog looks for its parent and new children.
    POLL_SECONDS = 0.5

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process

    @classmethod
    def start(cls) -> EngineWatchdog | None:
        if not sys.platform.startswith("linux") or (
            os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        ):
            return None
        root = Path(__file__).resolve().parents[2]  # importable even uninstalled
        code = (
            f"import sys; sys.path.insert(0, {str(root)!r}); "
            f"from {__name__} import EngineWatchdog; EngineWatchdog.main()"
        )
        before = sorted(_children(os.getpid()))
        process = subprocess.Popen(
            [sys.executable, "-c", code, str(cls.GRACE_SECONDS), *map(str, before)],
            stdin=subprocess.PIPE,
            close_fds=True,
        )
        return cls(process)

    def started(self) -> None:
        """The engine is up: what it spawned is known, stop looking."""
        self._say(b"started\n")

    def stop(self) -> None:
        """The engine was shut down here: end the watchdog, touching nothing."""
        self._say(b"stop\n")
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _say(self, message: bytes) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        try:
            stdin.write(message)
            stdin.flush()
            if message.startswith(b"stop"):
                stdin.close()
        except OSError:  # it is gone already
            pass

    @classmethod
    def main(cls) -> None:
        """The watchdog process: ``GRACE [PID ...]`` (children to leave alone)."""
        grace, *ignore = sys.argv[1:]
        owner, known = os.getppid(), {int(p) for p in ignore} | {os.getpid()}
        for sig in (signal.SIGINT, signal.SIGTERM):  # those are for the owner
            signal.signal(sig, signal.SIG_IGN)
        watched: dict[int, int] = {}  # pid -> pidfd
        looking = True
        while os.getppid() == owner:
            if looking:
                cls._watch(owner, known, watched)
            ready, _, _ = select.select([0], [], [], cls.POLL_SECONDS)
            if not ready:
                continue
            message = os.read(0, 64)
            if b"stop" in message:
                return
            if b"started" in message:
                cls._watch(owner, known, watched)
                looking = False
            if not message and not cls._orphaned(owner):
                return  # closed by a live owner: a stop
        cls._end(list(watched.values()), float(grace))

    @staticmethod
    def _orphaned(owner: int) -> bool:
        """After EOF: an exiting owner closes the pipe a moment before this
        process is re-parented."""
        deadline = time.monotonic() + 2
        while os.getppid() == owner and time.monotonic() < deadline:
            time.sleep(0.02)
        return os.getppid() != owner

    @staticmethod
    def _watch(owner: int, known: set[int], watched: dict[int, int]) -> None:
        for pid in _children(owner) - known - watched.keys():
            try:
                watched[pid] = os.pidfd_open(pid)
            except OSError:  # already gone
                known.add(pid)

    @staticmethod
    def _end(pidfds: list[int], grace: float) -> None:
        def send(fds: list[int], sig: int) -> None:
            for fd in fds:
                try:
                    signal.pidfd_send_signal(fd, sig)
                except OSError:
                    pass

        send(pidfds, signal.SIGTERM)
        deadline, alive = time.monotonic() + grace, set(pidfds)
        while alive and time.monotonic() < deadline:
            # A pidfd turns readable when its process has exited.
            exited, _, _ = select.select(list(alive), [], [], 0.1)
            alive -= set(exited)
        send(list(alive), signal.SIGKILL)
