"""conveyor's own example workflows (conveyor/examples/workflows.py), tested as a user
tests theirs: with the documented pytest plugin's ``conveyor_test`` fixture only (a real
worker thread, a throwaway SQLite database, timers advanced instead of waited for).

Each test is also the plugin's leak guard: once its fixture is torn down, no thread it
started is left running and no file descriptor it opened (the SQLite file and its WAL,
sockets, pipes) is left open."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from conveyor.examples import workflows as examples
from conveyor.testing import ConveyorTest


def _open_fds() -> dict[int, str]:
    """This process's open file descriptors and what each points at."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the descriptor listdir itself used, closed since
            continue
    return found


@pytest.fixture(autouse=True)
def _nothing_left_behind() -> Iterator[None]:
    # Set up before conveyor_test (autouse fixtures come first), so torn down after it.
    threads = set(threading.enumerate())
    fds = _open_fds()
    yield
    deadline = time.monotonic() + 5  # a thread told to stop may take a moment to end
    while (left := [t for t in threading.enumerate() if t not in threads and t.is_alive()]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert left == [], left
    opened = {fd: target for fd, target in _open_fds().items() if fds.get(fd) != target}
    assert opened == {}, opened


def test_daily_report_runs_its_pipeline(conveyor_test: ConveyorTest) -> None:
    run = conveyor_test.run(examples.daily_report, {"region": "eu", "days": 2})
    assert run.status == "succeeded"
    assert run.steps["summarize"].output["orders"] == 24
    assert run.output["render_report"].startswith("eu, last 2 days: 24 orders, $")


def test_gallery_thumbnails_fans_out_and_joins_once(conveyor_test: ConveyorTest) -> None:
    run = conveyor_test.run(examples.gallery_thumbnails, {"album": "trip", "size": 64})
    assert run.status == "succeeded"
    assert all(run.steps[name].status == "succeeded" for name in examples.RESIZE_STEPS)
    assert run.output["publish_gallery"]["thumbnails"] == examples.THUMBNAILS
    assert run.steps["publish_gallery"].attempts == 1


def test_supplier_sync_recovers_on_its_third_attempt(conveyor_test: ConveyorTest) -> None:
    run = conveyor_test.run(examples.supplier_sync, {"supplier": "acme", "skus": ["a1", "b22"]})
    assert run.status == "succeeded"
    pulled = run.steps["pull_stock_levels"]
    assert pulled.attempts == examples.SUPPLIER_RECOVERS_ON_ATTEMPT
    assert pulled.error is None  # it succeeded in the end: no error shown
    assert run.output == {"update_catalogue": {"skus_updated": 2, "units": 35}}


def test_charge_order_fails_on_a_declined_card_and_skips_the_receipt(
    conveyor_test: ConveyorTest,
) -> None:
    card = {"order_id": "o-1", "amount_cents": 1200, "card": examples.DECLINED_CARD}
    run = conveyor_test.run(examples.charge_order, card)
    assert run.status == "failed"
    charged = run.steps["charge_card"]
    assert (charged.status, charged.attempts) == ("failed", 1)  # a decline is not retried
    assert charged.error["type"] == "PaymentDeclined"
    assert run.steps["send_receipt"].status == "skipped"


def test_invoice_approval_pays_once_approved_after_its_grace_period(
    conveyor_test: ConveyorTest,
) -> None:
    run = conveyor_test.run(
        examples.invoice_approval,
        {"invoice_id": "inv-7", "amount_cents": 500},
        advance_timers=False,
    )
    assert run.steps["approval"].status == "waiting"
    conveyor_test.send_event(
        "invoice.approved", {"approved": True, "approver": "ada@example.com"}, key="inv-7"
    )
    run = conveyor_test.wait(run.execution_id)
    assert run.status == "succeeded"
    assert run.output == {"pay_invoice": "inv-7 paid (500 cents), approved by ada@example.com"}


def test_invoice_approval_fails_when_nobody_answers_for_seven_days(
    conveyor_test: ConveyorTest,
) -> None:
    run = conveyor_test.run(
        examples.invoice_approval,
        {"invoice_id": "inv-8", "amount_cents": 500},
        advance_timers=False,
    )
    assert run.steps["approval"].status == "waiting"
    conveyor_test.advance(timedelta(days=7, seconds=1))
    run = conveyor_test.wait(run.execution_id, advance_timers=False)
    assert run.status == "failed"
    assert run.steps["approval"].error["type"] == "WaitTimedOut"
    assert run.steps["pay_invoice"].status == "skipped"


def test_the_readmes_first_example_runs(conveyor_test: ConveyorTest) -> None:
    # README's front-page example, as written, less its last line (enqueueing belongs
    # to a producer; here the plugin runs it): the hour's sleep is skipped.
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    source = readme.split("```python\n", 1)[1].split("```", 1)[0]
    body, last = source.rstrip().rsplit("\n", 1)
    assert last.startswith("execution_id = enqueue(")
    namespace: dict[str, object] = {}
    exec(compile(body, "README.md", "exec"), namespace)
    run = conveyor_test.run(namespace["etl"], None)
    assert run.status == "succeeded"
    assert run.output == {"load": 6}
