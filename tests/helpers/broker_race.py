"""Publishers and consumers racing on one folder of the filesystem broker, through kombu.

Each side is a function that ``multiprocessing`` (spawn) starts in a fresh interpreter,
as separate producer and worker processes would be; ``race`` runs them and gathers what
every consumer received.

The queue is kept shallow, as an idle embedded worker's is (beat's message every second
taken as soon as it lands): a publisher needs one of ``BACKLOG`` credits per message and
a consumer returns one per delivery. Consumers poll without pause, so they list the
folder while messages are being written: where a half-written file is visible, they
find it.
"""

from __future__ import annotations

import multiprocessing
import traceback
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.queues import Queue as ProcessQueue
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Barrier, Event, Semaphore
from pathlib import Path
from typing import Any

from kombu import Connection, Exchange, Queue

from worker.filesystem_transport import TRANSPORT

STOCK_TRANSPORT = "kombu.transport.filesystem:Transport"
QUEUE = "race"
# A consumer that finds nothing for this long once every publisher is done stops.
IDLE_AFTER_PUBLISHING = 0.5
# Messages published and not yet delivered, at most.
BACKLOG = 8
# A publisher waiting this long for a credit gives up: messages are being lost.
CREDIT_TIMEOUT = 10.0


def transport_options(root: Path) -> dict[str, Any]:
    """The options worker.config gives the embedded broker, under ``root``."""
    for sub in ("queue", "processed", "control", "quarantine"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(root / "queue"),
        "data_folder_out": str(root / "queue"),
        "processed_folder": str(root / "processed"),
        "control_folder": str(root / "control"),
        "quarantine_folder": str(root / "quarantine"),
        "store_processed": False,
        "polling_interval": 0,
    }


def connection(root: Path, transport: str = TRANSPORT) -> Connection:
    """A kombu connection to the broker folder ``root`` through ``transport``."""
    return Connection(
        "filesystem://localhost/", transport=transport, transport_options=transport_options(root)
    )


def race_queue() -> Queue:
    """The queue under test, bound to a direct exchange of its name (as Celery's is)."""
    return Queue(QUEUE, Exchange(QUEUE, type="direct"), routing_key=QUEUE)


def publish(
    root: str, transport: str, index: int, count: int, credits: Semaphore, start: Barrier
) -> None:
    """Publish ``count`` messages ``<index>-<n>`` as fast as the backlog allows."""
    queue = race_queue()
    with connection(Path(root), transport) as conn:
        producer = conn.Producer(serializer="json")
        start.wait(timeout=60)
        for n in range(count):
            if not credits.acquire(timeout=CREDIT_TIMEOUT):
                raise RuntimeError(f"nothing delivered for {CREDIT_TIMEOUT} s; {n} published")
            producer.publish(
                {"id": f"{index}-{n}"},
                exchange=queue.exchange,
                routing_key=QUEUE,
                declare=[queue],
            )


def consume(
    root: str,
    transport: str,
    index: int,
    total: int,
    delivered: Synchronized[int],
    credits: Semaphore,
    published: Event,
    start: Barrier,
    results: ProcessQueue[tuple[int, list[str], str | None]],
) -> None:
    """Consume until every message is delivered, or nothing comes after publishing ends;
    report the ids received and the exception that stopped it, if any."""
    received: list[str] = []
    error: str | None = None

    def on_message(body: dict[str, str], message: Any) -> None:
        received.append(body["id"])
        message.ack()
        with delivered.get_lock():
            delivered.value += 1
        credits.release()

    try:
        with (
            connection(Path(root), transport) as conn,
            conn.Consumer([race_queue()], callbacks=[on_message], accept=["json"]),
        ):
            start.wait(timeout=60)
            while delivered.value < total:
                try:
                    conn.drain_events(timeout=IDLE_AFTER_PUBLISHING)
                except TimeoutError:
                    if published.is_set():
                        break
    except Exception:
        error = traceback.format_exc()
    results.put((index, received, error))


@dataclass
class RaceResult:
    """What the consumers of one race received, and how each ended."""

    expected: set[str]
    publisher_exits: list[int | None] = field(default_factory=list)
    received: dict[int, list[str]] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)

    @property
    def counts(self) -> Counter[str]:
        """Times each id was delivered, over every consumer."""
        return Counter(i for ids in self.received.values() for i in ids)

    @property
    def lost(self) -> set[str]:
        """Ids published and never delivered."""
        return self.expected - set(self.counts)

    @property
    def duplicated(self) -> set[str]:
        """Ids delivered more than once."""
        return {i for i, n in self.counts.items() if n > 1}

    def summary(self) -> str:
        """One line: how many were lost and duplicated, and the consumers' errors."""
        errors = "".join(f"\nconsumer {i} raised:\n{text}" for i, text in self.errors.items())
        return (
            f"publishers exited {self.publisher_exits}; "
            f"{len(self.expected)} published, {sum(self.counts.values())} delivered, "
            f"{len(self.lost)} never delivered, {len(self.duplicated)} delivered twice{errors}"
        )


def race(
    root: Path, transport: str, publishers: int, messages_each: int, consumers: int
) -> RaceResult:
    """Start every publisher and consumer at once; wait for them all; what was received."""
    context = multiprocessing.get_context("spawn")
    total = publishers * messages_each
    start = context.Barrier(publishers + consumers)
    delivered = context.Value("i", 0)
    credits = context.Semaphore(BACKLOG)
    published = context.Event()
    results: ProcessQueue[tuple[int, list[str], str | None]] = context.Queue()
    producing = [
        context.Process(
            target=publish, args=(str(root), transport, i, messages_each, credits, start)
        )
        for i in range(publishers)
    ]
    consuming = [
        context.Process(
            target=consume,
            args=(str(root), transport, i, total, delivered, credits, published, start, results),
        )
        for i in range(consumers)
    ]
    for process in producing + consuming:
        process.start()
    result = RaceResult({f"{p}-{n}" for p in range(publishers) for n in range(messages_each)})
    for process in producing:
        process.join(timeout=90)
        result.publisher_exits.append(process.exitcode)
    published.set()
    for _ in consuming:
        index, received, error = results.get(timeout=90)
        result.received[index] = received
        if error is not None:
            result.errors[index] = error
    for process in consuming:
        process.join(timeout=30)
    return result


def bind(root: str, transport: str, index: int, exchanges: int, start: Barrier) -> None:
    """Bind queue ``q<index>`` to the fanout exchanges ``fan<n>`` one after the other (a
    worker's pidbox queue is bound so), all binders at once."""
    with connection(Path(root), transport) as conn:
        start.wait(timeout=60)
        for n in range(exchanges):
            Queue(f"q{index}", Exchange(f"fan{n}", type="fanout"))(conn.default_channel).declare()


def bind_at_once(root: Path, transport: str, binders: int, exchanges: int) -> list[int | None]:
    """Run ``binders`` processes of ``bind`` together; their exit codes."""
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(binders)
    binding = [
        context.Process(target=bind, args=(str(root), transport, i, exchanges, start))
        for i in range(binders)
    ]
    for process in binding:
        process.start()
    for process in binding:
        process.join(timeout=60)
    return [process.exitcode for process in binding]


def enqueue_executions(
    database_url: str,
    broker_folder: str,
    index: int,
    count: int,
    start: Barrier,
    results: ProcessQueue[tuple[int, list[str], str | None]],
) -> None:
    """A producer process on the embedded default: enqueue ``count`` executions of
    ``linear`` (tests/e2e/workflows.py) one by one, as fast as it can; report their ids
    and the exception that stopped it, if any."""
    from core.config import Settings
    from core.registry import WorkflowRegistry
    from worker.app import create_app
    from worker.producer import enqueue

    ids: list[str] = []
    error: str | None = None
    try:
        registry = WorkflowRegistry()
        registry.load_module("tests.e2e.workflows")
        settings = Settings(
            database_url=database_url,
            broker_url="filesystem://localhost/",
            broker_folder=broker_folder,
            db_retry_attempts=50,
            db_retry_initial_wait=0.01,
            db_retry_max_wait=0.2,
        )
        app = create_app(settings, registry)
        start.wait(timeout=60)
        for n in range(count):
            ids.append(enqueue("linear", {"start": index * count + n}, app=app))
        app.engine.manager.database.dispose()
    except Exception:
        error = traceback.format_exc()
    results.put((index, ids, error))


def enqueue_from_processes(
    database_url: str, broker_folder: Path, processes: int, count: int
) -> list[str]:
    """Run ``processes`` producers of ``count`` executions each, all at once; every id."""
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(processes)
    results: ProcessQueue[tuple[int, list[str], str | None]] = context.Queue()
    producing = [
        context.Process(
            target=enqueue_executions,
            args=(database_url, str(broker_folder), i, count, start, results),
        )
        for i in range(processes)
    ]
    for process in producing:
        process.start()
    ids: list[str] = []
    errors: list[str] = []
    for _ in producing:
        _, enqueued, error = results.get(timeout=120)
        ids += enqueued
        errors += [error] if error else []
    for process in producing:
        process.join(timeout=30)
    assert not errors, "a producer raised:\n" + "\n".join(errors)
    return ids
