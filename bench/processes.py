"""Worker processes a benchmark starts, and the CPU they and PostgreSQL use.

Each worker command runs in its own session (process group), with its output in a log
file; ``stop()`` asks each to shut down warmly (SIGTERM), then kills what is left of
the groups it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import psutil

from bench.harness import BenchError

ROOT = Path(__file__).resolve().parent.parent
STOP_SECONDS = 30.0


def cpu_seconds(roots: Iterable[int]) -> float:
    """User + system CPU seconds of the processes ``roots`` and all their live children."""
    total = 0.0
    for pid in roots:
        try:
            root = psutil.Process(pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for process in tree:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:  # exited between the listing and the read
                continue
            total += times.user + times.system
    return total


class Workers:
    """A group of worker processes (one command each) for the length of a block."""

    def __init__(
        self,
        name: str,
        commands: Sequence[Sequence[str]],
        env: Mapping[str, str],
        folder: Path,
        ready_marker: str | None = None,
    ) -> None:
        self.name = name
        self._commands = [list(c) for c in commands]
        self._env = {**os.environ, **env}
        self._folder = folder
        self._ready_marker = ready_marker
        self._processes: list[subprocess.Popen[bytes]] = []
        self._logs: list[Path] = []

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids (their pool children are found from them)."""
        return [process.pid for process in self._processes]

    def cpu_seconds(self) -> float:
        """CPU seconds the workers (and their children) have used so far."""
        return cpu_seconds(self.pids)

    def start(self) -> None:
        """Start every command; with a ready marker, wait until each has printed it."""
        for index, command in enumerate(self._commands):
            log = self._folder / f"{self.name}-{index}.log"
            with log.open("wb") as output:
                process = subprocess.Popen(
                    command,
                    cwd=ROOT,
                    env=self._env,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self._processes.append(process)
            self._logs.append(log)
            if self._ready_marker is not None:
                self._wait_for_marker(process, log, self._ready_marker)

    def _wait_for_marker(self, process: subprocess.Popen[bytes], log: Path, marker: str) -> None:
        deadline = time.monotonic() + 120
        while marker not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{self.name} worker did not start:\n{self.tail()}")
            time.sleep(0.05)

    def check_alive(self) -> None:
        """Raise BenchError with the logs' tails if a worker has exited."""
        if any(process.poll() is not None for process in self._processes):
            raise BenchError(f"a {self.name} worker exited:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        """The last lines of each worker's log."""
        parts = []
        for log in self._logs:
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(parts)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL for the groups still there after 30 s."""
        for process in self._processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        for process in self._processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            # The group (pool children included) was started by us, in its own session.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        self._processes.clear()

    def __enter__(self) -> Workers:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()


def celery_worker(app: str, concurrency: int, node: str, *queues: str) -> list[str]:
    """``celery -A app worker -P prefork -c N``, run by this interpreter."""
    command = [sys.executable, "-m", "celery", "-A", app, "worker", "-P", "prefork"]
    command += ["-c", str(concurrency), "-n", f"{node}@%h", "--loglevel", "WARNING"]
    return command + (["-Q", ",".join(queues)] if queues else [])
