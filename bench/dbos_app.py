"""The DBOS baseline a worker process runs: ``python -m bench.dbos_app URL EXECUTOR``.

A queued workflow of N steps (the first returns the time it started, the others
nothing), on the DBOS system database at URL; it prints ``READY`` once launched and
runs until SIGTERM. Needs the bench extra: ``pip install .[bench]``.
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


def main(argv: list[str]) -> int:
    """Launch DBOS on the system database ``argv[0]`` as executor ``argv[1]``."""
    url, executor = argv
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
    DBOS.register_queue(
        QUEUE, worker_concurrency=WORKER_CONCURRENCY, polling_interval_sec=POLLING_SECONDS
    )
    print(READY, flush=True)
    stop.wait()
    DBOS.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
