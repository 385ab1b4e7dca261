"""Sending ``fault.approved`` from the test process while a fault runs.

``EventSender`` sends one event per ``approval`` execution from a thread of its own,
through ``worker.producer.send_event`` (the cluster's producer app: the test's database
and Redis): those of ``at_once`` as it starts (before their waits can exist, when those
executions wait behind other work), then those of ``later`` in a random order at random
moments. The receipt tells whether a wait was there (it took the event at once) or not
(the event is stored for the wait to take when established); the figures count both.
Some events are sent again with the same idempotency key: the send must answer with the
first event, stored once.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tests.faults import workflows
from worker.app import ConveyorCelery
from worker.producer import send_event

RESEND_SHARE = 0.2  # events sent a second time with their idempotency key


@dataclass
class Sent:
    """What the sender did: events by start, and how each was received."""

    event_ids: dict[int, int] = field(default_factory=dict)
    to_a_waiting_wait: int = 0  # a wait was armed: it took the event as it was sent
    stored_for_later: int = 0  # no wait yet: kept for the wait to take when established
    resent: int = 0
    problems: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, int]:
        return {
            "events sent": len(self.event_ids),
            "events taken by a waiting wait": self.to_a_waiting_wait,
            "events sent before their wait": self.stored_for_later,
            "events re-sent (same idempotency key)": self.resent,
        }


def send_one(app: ConveyorCelery, start: int, sent: Sent, rng: random.Random) -> None:
    """Send the event of the ``approval`` execution started from ``start`` (sometimes
    twice, with its idempotency key), recording the receipt in ``sent``."""
    key = workflows.approval_key(start)
    receipt = send_event(
        workflows.APPROVAL_EVENT,
        key=key,
        payload=workflows.approval_payload(start),
        idempotency_key=f"approve-{key}",
        app=app,
    )
    sent.event_ids[start] = receipt.event_id
    if receipt.duplicate:
        sent.problems.append(f"the first send for {key} was answered as a duplicate")
    if receipt.consumed_by:
        sent.to_a_waiting_wait += 1
    else:
        sent.stored_for_later += 1
    if rng.random() < RESEND_SHARE:
        again = send_event(
            workflows.APPROVAL_EVENT,
            key=key,
            payload=workflows.approval_payload(start),
            idempotency_key=f"approve-{key}",
            app=app,
        )
        sent.resent += 1
        if not again.duplicate or again.event_id != receipt.event_id:
            sent.problems.append(
                f"re-sending {key} stored event #{again.event_id} "
                f"(duplicate={again.duplicate}), the first was #{receipt.event_id}"
            )


def send_events(app: ConveyorCelery, starts: Sequence[int], sent: Sent | None = None) -> Sent:
    """Send the events of ``starts`` now, one after another, from this thread."""
    sent = sent or Sent()
    rng = random.Random()
    for start in starts:
        send_one(app, start, sent, rng)
    assert not sent.problems, sent.problems
    return sent


class EventSender:
    """A thread sending the events of the ``at_once`` starts at once, then those of the
    ``later`` starts at random moments ``pause`` seconds apart."""

    def __init__(
        self,
        app: ConveyorCelery,
        *,
        at_once: Sequence[int] = (),
        later: Sequence[int] = (),
        pause: tuple[float, float] = (0.0, 0.4),
        rng: random.Random | None = None,
    ) -> None:
        self.app = app
        self.rng = rng or random.Random()
        self.at_once = list(at_once)
        self.later = list(later)
        self.rng.shuffle(self.later)
        self.pause = pause
        self.sent = Sent()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="event-sender", daemon=True)

    def _run(self) -> None:
        try:
            for start in self.at_once:
                send_one(self.app, start, self.sent, self.rng)
            for start in self.later:
                time.sleep(self.rng.uniform(*self.pause))  # a random moment of the run
                send_one(self.app, start, self.sent, self.rng)
        except BaseException as error:  # re-raised in the test by join()
            self.error = error

    def start(self) -> EventSender:
        self.thread.start()
        return self

    def join(self, timeout: float = 120.0) -> Sent:
        """Wait for every event to be sent; what was sent (raises what the thread did)."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the sender still runs after {timeout}s"
        if self.error is not None:
            raise self.error
        assert not self.sent.problems, self.sent.problems
        return self.sent
