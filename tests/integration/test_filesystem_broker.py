"""The embedded broker (worker.filesystem_transport) through kombu, on a real folder.

Publishers and consumers are separate processes (tests/helpers/broker_race.py), as a
worker, beat and producers are; a consumer is a kombu consumer draining events, as
Celery's is.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import pytest

from core.config import Settings
from core.registry import WorkflowRegistry
from tests.helpers.broker_race import QUEUE, bind_at_once, connection, race, race_queue
from worker.app import create_app
from worker.filesystem_transport import TRANSPORT, Channel, Transport


def test_publishers_and_two_consumers_deliver_every_message_exactly_once(
    tmp_path: Path,
) -> None:
    """Three processes publish 3,000 messages while two drain the queue without pause:
    no consumer raises, every message is delivered once, nothing is left behind."""
    result = race(tmp_path, TRANSPORT, publishers=3, messages_each=1000, consumers=2)
    assert result.errors == {}, result.summary()
    assert result.publisher_exits == [0, 0, 0], result.summary()
    assert not result.lost, result.summary()
    assert not result.duplicated, result.summary()
    assert all(result.received.values()), "one consumer took every message: no race"
    assert sorted((tmp_path / "queue").iterdir()) == []
    assert sorted((tmp_path / "quarantine").iterdir()) == []


def _drain(root: Path, expected: int) -> list[dict[str, Any]]:
    """Consume from the race queue until ``expected`` messages came; their bodies."""
    bodies: list[dict[str, Any]] = []

    def on_message(body: dict[str, Any], message: Any) -> None:
        bodies.append(body)
        message.ack()

    with (
        connection(root) as conn,
        conn.Consumer([race_queue()], callbacks=[on_message], accept=["json"]),
    ):
        while len(bodies) < expected:
            conn.drain_events(timeout=5)
    return bodies


def _publish(root: Path, body: dict[str, Any]) -> None:
    queue = race_queue()
    with connection(root) as conn:
        conn.Producer(serializer="json").publish(
            body, exchange=queue.exchange, routing_key=QUEUE, declare=[queue]
        )


def test_an_undecodable_message_file_is_quarantined_and_logged_and_consuming_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _publish(tmp_path, {"id": "before"})
    # Named as messages of the queue, older than the one published: taken first.
    bad = {
        f"0_0-{uuid.uuid4()}.{QUEUE}.msg": b"",  # what kombu's publisher shows mid-write
        f"0_1-{uuid.uuid4()}.{QUEUE}.msg": b"{not json",
        f"0_2-{uuid.uuid4()}.{QUEUE}.msg": b'{"json": "but no message properties"}',
    }
    for name, content in bad.items():
        (tmp_path / "queue" / name).write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="worker.filesystem_transport"):
        first = _drain(tmp_path, 1)
        _publish(tmp_path, {"id": "after"})
        second = _drain(tmp_path, 1)
    assert [body["id"] for body in first + second] == ["before", "after"]
    quarantine = tmp_path / "quarantine"
    assert {p.name: p.read_bytes() for p in quarantine.iterdir()} == bad
    assert sorted((tmp_path / "queue").iterdir()) == []
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == len(bad), errors
    for name, message in zip(sorted(bad), errors, strict=True):
        assert f"undecodable message {tmp_path / 'queue' / name}" in message
        assert f"moved to {quarantine / name}" in message


def test_filesystem_broker_urls_get_conveyors_transport_and_keep_their_name(
    tmp_path: Path,
) -> None:
    """The URL users already have (filesystem://localhost/) selects the new transport."""
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'state.db'}",
        broker_url="filesystem://localhost/",
        broker_folder=str(tmp_path / "broker"),
    )
    app = create_app(settings, WorkflowRegistry())
    with app.connection_for_write() as conn:
        assert isinstance(conn.transport, Transport)
        assert conn.as_uri() == "filesystem://localhost/"
        options = conn.transport_options or {}
    assert options["quarantine_folder"] == str(tmp_path / "broker" / "quarantine")
    assert (tmp_path / "broker" / "quarantine").is_dir()


def test_two_broker_folders_in_one_process_each_deliver_their_own_messages(
    tmp_path: Path,
) -> None:
    """kombu kept one binding state per process: the second folder got no exchange table
    and its messages were dropped as undeliverable."""
    for name in ("first", "second"):
        _publish(tmp_path / name, {"id": name})
        assert [body["id"] for body in _drain(tmp_path / name, 1)] == [name]


BINDERS = 4
EXCHANGES = 200


def test_processes_binding_queues_to_one_exchange_at_once_all_keep_their_binding(
    tmp_path: Path,
) -> None:
    """kombu truncated an exchange's table before locking it: binders at once dropped
    each other's rows (a worker's pidbox among them), or read the table empty."""
    exits = bind_at_once(tmp_path, TRANSPORT, BINDERS, EXCHANGES)
    assert exits == [0] * BINDERS
    with connection(tmp_path) as conn:
        channel = conn.default_channel
        assert isinstance(channel, Channel)
        tables = {n: {row.queue for row in channel.get_table(f"fan{n}")} for n in range(EXCHANGES)}
    everyone = {f"q{i}" for i in range(BINDERS)}
    assert {n: queues for n, queues in tables.items() if queues != everyone} == {}
