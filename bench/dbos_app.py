"""The DBOS baseline a worker process runs: ``python -m bench.dbos_app URL EXECUTOR``.

A queued workflow of N steps (the first returns the time it started, the others
nothing), on the DBOS system database at URL; it prints ``READY`` once launched and
runs until SIGTERM. With a third argument ``receive`` (the waits extra) it serves a
queue of its own instead, of ``bench_receive``: a ``ready`` step, a wait in
``DBOS.recv``, then the time recv returned; many run at once (a waiting workflow holds
its slot). Needs the bench extra: ``pip install .[bench]``.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from types import FrameType

from dbos import DBOS, DBOSConfig

QUEUE = "bench"
IDLE_QUEUE = "bench_idle"  # enqueue-only measurements: no worker takes from it
WORKFLOW = "bench_chain"
RECEIVE_QUEUE = "bench_receive"
RECEIVE_WORKFLOW = "bench_receive"
RECEIVE_TOPIC = "go"
RECEIVE_CONCURRENCY = 200
RECEIVE_TIMEOUT = 600.0
READY = "READY"
# One workflow at a time per process (as a prefork child runs one task), two processes.
WORKER_CONCURRENCY = 1
POLLING_SECONDS = 0.05


@DBOS.step()
def stamp() -> float:
    """Return the time the step started (seconds since the epoch)."""
    return time.time()


@DBOS.step()
def noop() -> None:
    """Do nothing."""


@DBOS.workflow(name=WORKFLOW)
def chain(steps: int) -> float:
    """``steps`` steps one after the other; the time the first one started."""
    started = stamp()
    for _ in range(steps - 1):
        noop()
    return started


@DBOS.step()
def ready() -> None:
    """Recorded once the workflow runs: what the benchmark polls before sending."""


@DBOS.workflow(name=RECEIVE_WORKFLOW)
def receive() -> float:
    """Wait for a message on ``RECEIVE_TOPIC``; the time ``recv`` returned."""
    ready()
    DBOS.recv(RECEIVE_TOPIC, timeout_seconds=RECEIVE_TIMEOUT)
    return time.time()


def main(argv: list[str]) -> int:
    """Launch DBOS on the system database ``argv[0]`` as executor ``argv[1]``; with a
    third argument ``receive``, serving the receive queue instead of the chains'."""
    url, executor, *role = argv
    receiving = role == ["receive"]
    config: DBOSConfig = {
        "name": "conveyor-bench",
        "system_database_url": url,
        "executor_id": executor,
        "log_level": "WARNING",
    }
    DBOS(config=config)
    stop = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    DBOS.launch()
    if receiving:
        DBOS.register_queue(
            RECEIVE_QUEUE,
            worker_concurrency=RECEIVE_CONCURRENCY,
            polling_interval_sec=POLLING_SECONDS,
        )
    else:
        DBOS.register_queue(
            QUEUE, worker_concurrency=WORKER_CONCURRENCY, polling_interval_sec=POLLING_SECONDS
        )
    print(READY, flush=True)
    stop.wait()
    DBOS.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
