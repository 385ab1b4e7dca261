"""A conveyor deployment of separate processes for the fault tests.

Two ``celery -A worker.app worker`` processes (prefork, 2 children each) and one
``celery -A worker.app beat``, on the test's database and its own Redis, with short
heartbeat, stall and reconcile settings; each in its own process group, so that
``stop()`` ends everything (orphaned pool children included) whatever the test did.
``stop_all()`` kills every process and keeps the folder and the database;
``start_again()`` starts a fresh set on them (a whole deployment restarted).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import redis

from core.config import Settings
from core.registry import WorkflowRegistry
from tests.conftest import TestDatabase
from tests.faults import inject, workflows
from tests.servers import RedisServer
from worker.app import create_app
from worker.config import MAX_PRIORITY
from worker.producer import enqueue, enqueue_many

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0
MAP_ITEMS = 40  # items of each map in the fault mixes
# A Celery log line's start: "[2026-12-04 16:02:22,559: INFO/MainProcess] ..." (local time).
LOGGED_AT = re.compile(rb"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): ")
SETTINGS = {
    "CONVEYOR_HEARTBEAT_INTERVAL": "0.5",
    "CONVEYOR_STALL_TIMEOUT": "4",
    "CONVEYOR_RECONCILE_INTERVAL": "1",
    "CONVEYOR_REPUBLISH_AFTER": "5",
    "CONVEYOR_START_AFTER": "2",
}


@dataclass
class Process:
    """One started celery process (the leader of its own process group)."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def children(self) -> list[int]:
        """Pids of this process's live children (the prefork pool)."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                # "pid (comm) state ppid ...": comm may hold spaces, so split after ")".
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == self.pid and fields[0] != "Z":
                found.append(int(stat.parent.name))
        return found

    def logged_at(self, text: str) -> datetime | None:
        """When this process first logged a line containing ``text`` (None: not yet)."""
        for line in self.log.read_bytes().splitlines():
            if text.encode() in line and (found := LOGGED_AT.match(line)):
                # The processes log in this machine's local time (naive): made aware here.
                logged = datetime.strptime(found.group(1).decode(), "%Y-%m-%d %H:%M:%S,%f")  # noqa: DTZ007
                return logged.astimezone()
        return None


@dataclass
class WaitMix:
    """Executions enqueued by ``Cluster.enqueue_mix``: their ids and step count, the
    start numbers of the approvals armed early (``early``) and enqueued last (``late``),
    and the ids of the executions under the key ``fault-limit`` (``limited``)."""

    ids: list[str]
    steps: int
    early: list[int]
    late: list[int]
    limited: list[str] = field(default_factory=list)


class Cluster:
    """Workers and beat as separate processes, plus a producer app in the test process."""

    def __init__(
        self,
        database: TestDatabase,
        redis: RedisServer,
        folder: Path,
        *,
        inject_mode: str | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.database = database
        self.redis = redis
        self.folder = folder
        self.run_log = folder / "runs.log"
        self.inject_log = folder / "injected.log"
        self.gate = folder / "gate"
        self.spans_log = folder / "spans.log"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "CONVEYOR_DATABASE_URL": database.url,
            "CONVEYOR_BROKER_URL": redis.url,
            "CONVEYOR_WORKFLOW_MODULES": f"{workflows.__name__},{inject.__name__}",
            **SETTINGS,
            **(settings or {}),
            workflows.RUN_LOG_ENV: str(self.run_log),
            inject.LOG_ENV: str(self.inject_log),
            workflows.GATE_ENV: str(self.gate),
            workflows.SPANS_ENV: str(self.spans_log),
        }
        self.env.pop(inject.MODE_ENV, None)
        if inject_mode:
            self.env[inject.MODE_ENV] = inject_mode
        self.processes: list[Process] = []
        self.workers: list[Process] = []
        self.beat: Process | None = None
        registry = WorkflowRegistry()
        registry.load_module(workflows.__name__)
        # The same settings as the processes: a test may run a reconciler pass itself.
        tuned = {
            key.removeprefix("CONVEYOR_").lower(): value
            for key, value in {**SETTINGS, **(settings or {})}.items()
        }
        self.app = create_app(
            Settings(database_url=database.url, broker_url=redis.url, **tuned), registry
        )

    # --- processes -------------------------------------------------------------------

    def _spawn(
        self, name: str, arguments: list[str], env: Mapping[str, str] | None = None
    ) -> Process:
        log = self.folder / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "worker.app", *arguments],
                cwd=REPO,
                env={**self.env, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def spawn_worker(self, env: Mapping[str, str] | None = None) -> Process:
        """Start one more worker process (not waiting for it); ``env`` is merged over the
        cluster's (another release of the code: ``{workflows.RELEASE_ENV: "new"}``)."""
        name = f"worker{len([p for p in self.processes if p.name.startswith('worker')]) + 1}"
        worker = self._spawn(
            name,
            [
                "worker",
                "--pool",
                "prefork",
                "--concurrency",
                "2",
                "--loglevel",
                "info",
                "--without-mingle",
                "--without-gossip",
                "--hostname",
                f"{name}@%h",
            ],
            env,
        )
        self.workers.append(worker)
        return worker

    def wait_ready(self, worker: Process) -> None:
        """Poll the worker's log until Celery says it is ready."""
        deadline = time.monotonic() + START_TIMEOUT
        while b"ready." not in worker.log.read_bytes():
            assert worker.popen.poll() is None, worker.log.read_text()
            assert time.monotonic() < deadline, worker.log.read_text()
            time.sleep(0.1)

    def start(self, workers: int = 2) -> list[Process]:
        """Start the workers and beat; return them once every worker is ready."""
        started = [self.spawn_worker() for _ in range(workers)]
        beats = len([p for p in self.processes if p.name.startswith("beat")])
        self.beat = self._spawn(
            f"beat{beats + 1}" if beats else "beat",
            [
                "beat",
                "--schedule",
                str(self.folder / "beat-schedule"),
                # Each tick's "Sending due task" line (DEBUG for conveyor's own tasks):
                # when beat began ticking.
                "--loglevel",
                "debug",
            ],
        )
        for worker in started:
            self.wait_ready(worker)
        return started

    def stop_all(self) -> list[int]:
        """SIGKILL every worker (pools included) and beat at once; the database, Redis and
        the folder stay. The pids it ended."""
        ended: list[int] = []
        live = [p for p in self.processes if p.popen.poll() is None]
        for process in live:
            ended += [process.pid, *process.children()]
        for process in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        for process in live:
            process.popen.wait()
        self.workers.clear()
        self.beat = None
        return ended

    def start_again(self, workers: int = 2) -> list[Process]:
        """After ``stop_all()``: a new set of workers and beat on the same database,
        Redis and folder (beat keeps its schedule file); returns once every worker is
        ready, with the new workers."""
        assert not self.workers, "stop_all() first"
        assert self.beat is None, "stop_all() first"
        return self.start(workers)

    def kill_worker(self, worker: Process) -> list[int]:
        """SIGKILL a worker's main process (its pool is orphaned); the pids it ends."""
        pids = [worker.pid, *worker.children()]
        worker.popen.send_signal(signal.SIGKILL)
        worker.popen.wait()
        self.workers.remove(worker)
        return pids

    def stop(self) -> None:
        """SIGKILL every process group started here; the state is already checked."""
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.popen.wait()
        self.app.close()

    def wait_broker_drained(self, timeout: float) -> float:
        """Poll Redis until no conveyor message waits or is held unacknowledged (held ones
        include messages with a countdown); the seconds it took, failing at ``timeout``."""
        queues = [self.env.get("CONVEYOR_DEFAULT_QUEUE", "conveyor")]
        queues += [f"{queues[0]}:{priority}" for priority in range(1, MAX_PRIORITY + 1)]
        client = redis.Redis.from_url(self.redis.url)
        started = time.monotonic()
        try:
            while True:
                waiting = sum(int(client.llen(queue)) for queue in queues)
                held = int(client.hlen("unacked"))
                if not waiting and not held:
                    return time.monotonic() - started
                assert time.monotonic() - started < timeout, (
                    f"{waiting} message(s) still queued and {held} unacknowledged after {timeout}s"
                )
                time.sleep(0.1)
        finally:
            client.close()

    def log_count(self, text: str) -> int:
        """Lines containing ``text`` in every worker's log."""
        return sum(
            line.count(text.encode())
            for process in self.processes
            if process.name.startswith("worker")
            for line in process.log.read_bytes().splitlines()
        )

    # --- work ------------------------------------------------------------------------

    def enqueue(self, workflow: str, starts: Sequence[int]) -> list[str]:
        """One execution of ``workflow`` per start number, each enqueued on its own."""
        return [enqueue(workflow, {"start": start}, app=self.app) for start in starts]

    def enqueue_sleepy(self, starts: Sequence[int], seconds: Sequence[float]) -> list[str]:
        """One ``sleepy`` (a -> sleep -> b) per start number, sleeping ``seconds[i]``."""
        return [
            enqueue(workflows.sleepy.name, {"start": start, "seconds": nap}, app=self.app)
            for start, nap in zip(starts, seconds, strict=True)
        ]

    def enqueue_map(
        self,
        starts: Sequence[int],
        items: int,
        item_seconds: float = workflows.STEP_SECONDS[1],
        *,
        workflow: str = workflows.mapped.name,
        priority: int | None = None,
    ) -> list[str]:
        """One map workflow execution (numbers -> square, a map over ``items`` numbers
        -> total) per start number, each item taking up to ``item_seconds``."""
        return [
            enqueue(
                workflow,
                {"start": start, "items": items, "item_seconds": item_seconds},
                priority=priority,
                app=self.app,
            )
            for start in starts
        ]

    def enqueue_approval(self, starts: Sequence[int]) -> list[str]:
        """One ``approval`` (a -> wait for ``fault.approved`` -> b) per start number; the
        test sends the events (``tests.faults.senders``)."""
        return self.enqueue(workflows.approval.name, starts)

    def enqueue_mix(
        self,
        chains: int,
        fans: int,
        *,
        sleepies: int,
        approvals: int,
        parents: int,
        sleep_seconds: tuple[float, float],
        rng: random.Random,
        maps: int = 0,
        map_items: int = MAP_ITEMS,
        limited: int = 0,
    ) -> WaitMix:
        """The workload with waits around it: half the ``approval`` executions, the
        ``sleepy`` ones (sleeping a random number of ``sleep_seconds``), the ``parent``
        ones (each starting a child chain) and the ``maps`` (each a map of ``map_items``
        items, 8 at a time) and the ``limited`` ones (one step under the key
        ``fault-limit``, 2 at a time) ahead of the chains and fans, so their waits are
        armed early in the run; the other half of the approvals behind them, so that
        events sent at once come before their waits."""
        early = list(range(3000, 3000 + approvals // 2))
        late = list(range(4000, 4000 + approvals - len(early)))
        ids = self.enqueue_approval(early)
        ids += self.enqueue_sleepy(
            range(2000, 2000 + sleepies), [rng.uniform(*sleep_seconds) for _ in range(sleepies)]
        )
        ids += self.enqueue(workflows.parent.name, range(5000, 5000 + parents))
        ids += self.enqueue_map(range(7000, 7000 + maps), map_items)
        held = self.enqueue(workflows.limited.name, range(8000, 8000 + limited))
        ids += held
        ids += self.enqueue_workload(chains, fans)
        ids += self.enqueue_approval(late)
        # The steps of ``ids`` (their children's and the maps' items are not counted).
        steps = 10 * (chains + fans) + 3 * (sleepies + approvals + parents + maps) + limited
        return WaitMix(ids, steps, early, late, held)

    def enqueue_workload(self, chains: int, fans: int) -> list[str]:
        """``chains`` executions of the 10-step chain and ``fans`` of the 1 -> 8 -> 1 fan.

        The chains by one ``enqueue_many`` (start_batch messages, split by the workers),
        the fans each on its own (start messages): the faults hit both paths."""
        chains_ids = enqueue_many(
            workflows.chain.name, [{"start": start} for start in range(chains)], app=self.app
        )
        return chains_ids + self.enqueue(workflows.fan.name, range(1000, 1000 + fans))
