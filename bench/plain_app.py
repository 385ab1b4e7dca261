"""The plain Celery baseline the workers run: ``celery -A bench.plain_app worker``.

No-op tasks with conveyor's Celery configuration (JSON, ``acks_late``, prefetch 1,
task events, Redis priority queues) and a Redis result backend, which chords need.
The broker and the backend come from ``BENCH_BROKER_URL`` and ``BENCH_RESULT_URL``.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from celery.backends.redis import RedisBackend

from core.config import Settings
from core.registry import WorkflowRegistry
from worker.config import celery_config

QUEUE = "bench-plain"
NOOP = "bench.noop"
NOOP_RESULT = "bench.noop_result"
STAMP = "bench.stamp"


class ProducerBackend(RedisBackend):
    """Redis results for a producer that never waits on them.

    Celery's Redis backend subscribes a producer to the result of every message it
    sends; the benchmark reads the result keys itself, after the timed part.
    """

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Subscribe to nothing."""

    def on_result_fulfilled(self, result: Any) -> None:
        """Unsubscribe from nothing (``AsyncResult.__del__`` calls this)."""


def create_plain_app(broker_url: str, result_url: str, *, producer: bool = False) -> Celery:
    """A Celery app with conveyor's worker configuration and the no-op tasks."""
    settings = Settings(
        _env_file=None, database_url="sqlite://", broker_url=broker_url, default_queue=QUEUE
    )
    plain = Celery("bench_plain", set_as_current=False)
    config = celery_config(settings, WorkflowRegistry())
    config["beat_schedule"] = {}
    backend = f"{__name__}:{ProducerBackend.__name__}+" if producer else ""
    config["result_backend"] = backend + result_url
    plain.conf.update(config)

    @plain.task(name=NOOP, ignore_result=True, shared=False)
    def noop() -> None:
        """Do nothing."""

    @plain.task(name=NOOP_RESULT, ignore_result=False, shared=False)
    def noop_result() -> None:
        """Do nothing, and store that in the result backend (chords, last tasks)."""

    @plain.task(name=STAMP, ignore_result=False, shared=False)
    def stamp() -> float:
        """Return the time the task started (seconds since the epoch)."""
        return time.time()

    return plain


app = create_plain_app(
    os.environ.get("BENCH_BROKER_URL", "memory://"),
    os.environ.get("BENCH_RESULT_URL", "cache+memory://"),
)
