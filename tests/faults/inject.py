"""Broker faults injected from outside conveyor: no hook in production code.

Listed in CONVEYOR_WORKFLOW_MODULES, this module is imported by every worker and beat
process when the registry loads; with ``FAULTS_INJECT`` set it wraps the app class's
``send_task``, through which the engine sends every start and run-step message:

- ``duplicates``: each run-step and run-item (a map's item) message is sent 3 extra
  times: at once, late (with a countdown) and at another priority. (A step or item a
  worker continues to in-process, in the transaction that completed its upstream step
  or the item before, has no message to duplicate.)
- ``lost:0.2``: each start, start-batch or run-step publish fails (raises, as a broker
  that is down would) with that probability. Every such publish happens after its commit.
- ``fail:<step>``: every run-step publish of the step named ``<step>`` fails; the others
  are sent.
- ``fail-start:<execution>``: every start publish of the execution with that id fails;
  the others are sent.
- ``kill-at-start:<workflow>``: the first process about to publish the start of an
  execution of that workflow SIGKILLs itself (once across all processes): for a child
  workflow, the worker dies after the commit that created the child and armed its
  parent's wait, before the child's start is sent.

Each injected fault appends a line to ``FAULTS_INJECT_LOG`` for the test's figures.

The PostgreSQL process faults below (a hung server, a backend killed) are sent from the
test process to the test's own server, by signal: no hook in the server either.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from kombu.exceptions import OperationalError

from worker.app import ConveyorCelery
from worker.config import MAX_PRIORITY
from worker.engine import RUN_STEP, START_BATCH, START_EXECUTION
from worker.items import RUN_ITEM

MODE_ENV = "FAULTS_INJECT"
LOG_ENV = "FAULTS_INJECT_LOG"
LATE_SECONDS = (1.0, 3.0)

SendTask = Callable[..., Any]


def _note(line: str) -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


def faulty(original: SendTask, mode: str) -> SendTask:
    """``original`` (an unbound ``send_task``) with the faults of ``mode`` injected."""
    kind, _, rate = mode.partition(":")
    if kind == "duplicates":

        def send_with_duplicates(app: ConveyorCelery, name: str, *args: Any, **options: Any) -> Any:
            result = original(app, name, *args, **options)
            if name in (RUN_STEP, RUN_ITEM):
                _note("original")
                original(app, name, *args, **options)
                _note("duplicate early")
                late = (options.get("countdown") or 0) + random.uniform(*LATE_SECONDS)
                original(app, name, *args, **{**options, "countdown": late})
                _note("duplicate late")
                priority = options.get("priority") or 0
                other = MAX_PRIORITY - priority if priority * 2 != MAX_PRIORITY else 0
                original(app, name, *args, **{**options, "priority": other})
                _note("duplicate priority")
            return result

        return send_with_duplicates
    if kind == "lost":
        probability = float(rate or 0.2)

        def send_or_lose(app: ConveyorCelery, name: str, *args: Any, **options: Any) -> Any:
            if name in (RUN_STEP, START_EXECUTION, START_BATCH) and random.random() < probability:
                _note(f"lost {name}")
                raise OperationalError(f"injected fault: publishing {name} failed")
            return original(app, name, *args, **options)

        return send_or_lose
    if kind == "fail":

        def send_or_fail(app: ConveyorCelery, name: str, *args: Any, **options: Any) -> Any:
            if name == RUN_STEP and (options.get("kwargs") or {}).get("step_name") == rate:
                _note(f"failed {name} {rate}")
                raise OperationalError(f"injected fault: publishing step {rate} failed")
            return original(app, name, *args, **options)

        return send_or_fail
    if kind == "fail-start":

        def send_or_fail_start(app: ConveyorCelery, name: str, *args: Any, **options: Any) -> Any:
            if (
                name == START_EXECUTION
                and (options.get("kwargs") or {}).get("execution_id") == rate
            ):
                _note(f"failed {name} {rate}")
                raise OperationalError(f"injected fault: publishing the start of {rate} failed")
            return original(app, name, *args, **options)

        return send_or_fail_start
    if kind == "kill-at-start":

        def send_or_die(app: ConveyorCelery, name: str, *args: Any, **options: Any) -> Any:
            if name == START_EXECUTION and (options.get("kwargs") or {}).get("workflow") == rate:
                log = os.environ.get(LOG_ENV, "")
                try:  # once across every process: the marker is created exclusively
                    os.close(os.open(f"{log}.killed", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    return original(app, name, *args, **options)
                _note(f"killed before {name} {rate}")
                os.kill(os.getpid(), signal.SIGKILL)
            return original(app, name, *args, **options)

        return send_or_die
    raise ValueError(f"unknown {MODE_ENV} mode {mode!r}")


def injected_lines(path: Path) -> list[str]:
    """What the injector recorded (all processes), one fault a line."""
    return path.read_text().splitlines() if path.exists() else []


_mode = os.environ.get(MODE_ENV)
if _mode:
    ConveyorCelery.send_task = faulty(ConveyorCelery.send_task, _mode)  # type: ignore[method-assign]


# --- PostgreSQL processes ---------------------------------------------------------------

SIGQUIT_BIT = 1 << (signal.SIGQUIT - 1)


def postmaster_pid(data_dir: Path) -> int:
    """The pid of the server's postmaster (first line of ``postmaster.pid``)."""
    return int((data_dir / "postmaster.pid").read_text().split()[0])


def _children(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces, so split after ")".
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def server_processes(data_dir: Path) -> tuple[int, list[int]]:
    """The postmaster and its children (client backends and auxiliary processes)."""
    postmaster = postmaster_pid(data_dir)
    return postmaster, _children(postmaster)


def _signal_all(pids: Iterable[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
            os.kill(pid, signum)


def hang_server(data_dir: Path) -> list[int]:
    """SIGSTOP every process of the server (a hung server; to its clients, a network
    partition): connections stay open and nothing answers. The pids, for resume_server."""
    postmaster, children = server_processes(data_dir)
    stopped = [postmaster, *children]
    _signal_all(stopped, signal.SIGSTOP)
    return stopped


def resume_server(stopped: Iterable[int]) -> None:
    """SIGCONT what hang_server stopped."""
    _signal_all(stopped, signal.SIGCONT)


def _quit_pending(pid: int) -> bool:
    """Whether ``pid`` has a SIGQUIT pending, or is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    masks = [
        int(line.split()[1], 16)
        for line in status.splitlines()
        if line.startswith(("SigPnd:", "ShdPnd:"))
    ]
    return any(mask & SIGQUIT_BIT for mask in masks) or "State:\tZ" in status


def kill_a_backend_held_in_recovery(data_dir: Path, hold: float) -> int:
    """SIGKILL one client backend so that the server goes through crash recovery (every
    connection dropped, the postmaster, and so ``pg_postmaster_start_time()``, kept),
    with the server answering nothing for ``hold`` seconds first; the killed pid.

    A small server recovers in well under a second, so the outage is made to last: the
    postmaster and every other child are stopped before the kill, and resumed after
    ``hold``: the postmaster first, which finds its child killed, sends every other child
    SIGQUIT and reinitialises; the others are resumed once their SIGQUIT is pending, so
    none of them serves another statement before it quits.
    """
    postmaster, children = server_processes(data_dir)
    backends = [pid for pid in children if "127.0.0.1(" in _cmdline(pid)]
    if not backends:
        raise RuntimeError("no client backend to kill")
    victim = backends[0]
    others = [pid for pid in children if pid != victim]
    _signal_all([postmaster, *others], signal.SIGSTOP)
    os.kill(victim, signal.SIGKILL)
    time.sleep(hold)  # the outage itself: the server stays unanswering this long
    os.kill(postmaster, signal.SIGCONT)
    deadline = time.monotonic() + 30.0
    while not all(_quit_pending(pid) for pid in others):
        if time.monotonic() > deadline:
            break  # resume them anyway: the postmaster SIGKILLs children that linger
        time.sleep(0.01)
    _signal_all(others, signal.SIGCONT)
    return victim
