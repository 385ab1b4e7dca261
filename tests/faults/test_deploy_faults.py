"""A rolling deploy, black box: workers of the next release come up beside the old ones
mid-run, one old worker is SIGKILLed and the other stopped warm, producers of both
releases keep enqueueing, and an old worker comes back later.

The next release (``FAULTS_RELEASE=new``, see ``tests/faults/workflows.py``) marks a
chain link, the sleep workflow's last step and the map's total ``version=2``: a new
worker must not finish an execution the old code started, and an old worker must not
finish one the new code started. The fan is unchanged, so either release runs it. What
must hold:

- no execution fails, whichever worker a step reached: a step of the other release is
  handed back, never run or failed;
- with no old worker alive, the new release's executions finish, and the old release's
  ones wait visibly (``wait_kind`` ``version``) rather than stall unseen;
- when an old worker comes back, everything finishes, and the checker's invariants hold
  over both releases' executions (each completion recorded once, no step run twice
  unless its process was killed, every map item ended once, the event log replays).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Collection

import pytest
from sqlalchemy import func, select

from core.database import get_db_session
from core.models import MapItem, StepExecution, WorkflowExecution
from tests.faults import workflows
from tests.faults.checker import Figures, check, transitions, wait_mid_run, wait_until_final
from tests.faults.cluster import MAP_ITEMS, REPO, Process
from tests.faults.conftest import StartCluster

pytestmark = [pytest.mark.postgresql_only, pytest.mark.timeout(300)]

CHAINS, FANS, SLEEPIES, MAPS = 16, 6, 6, 2
LATE_OLD = 6  # enqueued by an old producer after every old worker is gone
NEW_CHAINS, NEW_SLEEPIES = 10, 4  # enqueued by a producer of the next release
SLEEP_SECONDS = (2.0, 5.0)  # asleep across the switch: woken with no old worker alive
NEW = {workflows.RELEASE_ENV: "new"}
OLD = {workflows.RELEASE_ENV: "old"}
FINISH_TIMEOUT = 120.0

# A producer process running the next release's code: its executions record that code's
# shape, as a web process deployed with the new workers would.
NEW_PRODUCER = """
import json, sys
from core.registry import WorkflowRegistry
from tests.faults import workflows
from worker.app import create_app
from worker.producer import enqueue_many

registry = WorkflowRegistry()
registry.load_module(workflows.__name__)
app = create_app(registry=registry)
ids = []
for name, inputs in json.loads(sys.argv[1]).items():
    ids += enqueue_many(name, inputs, app=app)
print(json.dumps(ids))
"""


def _held_for_a_version(execution_ids: Collection[str]) -> int:
    """Steps of these executions waiting for a worker of their release."""
    with get_db_session() as db:
        return db.execute(
            select(func.count())
            .select_from(StepExecution)
            .where(
                StepExecution.execution_id.in_(list(execution_ids)),
                StepExecution.status == "waiting",
                StepExecution.wait_kind == "version",
            )
        ).scalar_one()


def _failed(execution_ids: Collection[str]) -> list[str]:
    with get_db_session() as db:
        return list(
            db.execute(
                select(WorkflowExecution.execution_id).where(
                    WorkflowExecution.execution_id.in_(list(execution_ids)),
                    WorkflowExecution.status.in_(["failed", "cancelled", "timed_out"]),
                )
            ).scalars()
        )


def _ran_on(execution_ids: Collection[str]) -> dict[tuple[str, str], set[int]]:
    """The processes (``host:pid``'s pid) that ran each (workflow, step) of these
    executions; a map's items as the step ``square[]``."""
    found: dict[tuple[str, str], set[int]] = {}
    with get_db_session() as db:
        for model, suffix in ((StepExecution, ""), (MapItem, "[]")):
            rows = db.execute(
                select(WorkflowExecution.workflow_id, model.step_name, model.worker)
                .join(WorkflowExecution, WorkflowExecution.execution_id == model.execution_id)
                .where(model.execution_id.in_(list(execution_ids)), model.worker.is_not(None))
                .distinct()
            )
            for workflow, step, worker in rows:
                found.setdefault((workflow, step + suffix), set()).add(
                    int(worker.rsplit(":", 1)[1])
                )
    return found


def _pools(workers: Collection[Process]) -> dict[int, str]:
    """Each live pool process of ``workers``, with its worker's name."""
    return {pid: worker.name for worker in workers for pid in worker.children()}


def test_a_rolling_deploy_through_a_sigkill_strands_and_fails_nothing(
    start_cluster: StartCluster,
) -> None:
    cluster = start_cluster()  # two workers of the old release, and beat
    rng = random.Random()
    old_ids = cluster.enqueue_workload(CHAINS, FANS)
    old_ids += cluster.enqueue_sleepy(
        range(2000, 2000 + SLEEPIES), [rng.uniform(*SLEEP_SECONDS) for _ in range(SLEEPIES)]
    )
    old_ids += cluster.enqueue_map(range(3000, 3000 + MAPS), MAP_ITEMS)
    steps = CHAINS * workflows.CHAIN_LENGTH + FANS * (workflows.FAN_WIDTH + 2)
    wait_mid_run(old_ids, steps, fraction=0.2)

    # The deploy: new workers up, then the old ones go, one by a crash.
    old_workers = list(cluster.workers)
    new_workers = [cluster.spawn_worker(NEW) for _ in range(2)]
    for worker in new_workers:
        cluster.wait_ready(worker)
    pool = _pools(cluster.workers)  # pool process pid -> its worker's name
    dead = cluster.kill_worker(old_workers[0])
    warm = old_workers[1]
    warm.popen.send_signal(signal.SIGTERM)  # a warm shutdown finishes its running steps
    assert warm.popen.wait(timeout=60) == 0, warm.log.read_text()[-2000:]
    cluster.workers.remove(warm)

    old_ids += cluster.enqueue(workflows.chain.name, range(4000, 4000 + LATE_OLD))
    plan = {
        workflows.chain.name: [{"start": 5000 + i} for i in range(NEW_CHAINS)],
        workflows.sleepy.name: [
            {"start": 6000 + i, "seconds": rng.uniform(*SLEEP_SECONDS)} for i in range(NEW_SLEEPIES)
        ],
    }
    produced = subprocess.run(
        [sys.executable, "-c", NEW_PRODUCER, json.dumps(plan)],
        cwd=REPO,
        env={**cluster.env, **NEW},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    new_ids: list[str] = json.loads(produced.stdout)

    # Only the new release runs now: its executions finish; the old ones wait, visibly.
    seconds_new = wait_until_final(new_ids, FINISH_TIMEOUT)
    deadline = time.monotonic() + FINISH_TIMEOUT
    while not (held := _held_for_a_version(old_ids)):
        assert time.monotonic() < deadline, "no old execution's step waits for its release"
        time.sleep(0.2)
    assert _failed(old_ids + new_ids) == []

    # An old worker comes back and drains what the new code could not finish.
    returned = cluster.spawn_worker(OLD)
    cluster.wait_ready(returned)
    pool |= _pools([returned])
    seconds_old = wait_until_final(old_ids, FINISH_TIMEOUT)
    ids = old_ids + new_ids
    figures = Figures(
        seconds_to_finish=seconds_old,
        extra={
            "old-release executions": len(old_ids),
            "new-release executions": len(new_ids),
            "steps held for their release at the check": held,
            "handed back to wait": transitions(ids, "running", "waiting"),
            "seconds for the new release's executions": round(seconds_new, 1),
        },
    )
    try:
        check(ids, cluster.run_log, dead_pids=dead, figures=figures)
    finally:
        print(f"\nrolling deploy: {figures.line()}")
    assert _held_for_a_version(ids) == 0
    # Which release ran what. A changed step runs only on its execution's release (a
    # step after it may run on either once it is done, as the code after it is the same;
    # a map's items run before the changed total, so on the release too); the fan, the
    # same in both, anywhere.
    old_names = {w.name for w in [*old_workers, returned]}
    new_names = {w.name for w in new_workers}
    pool |= _pools(cluster.workers)  # a child a pool replaced since
    changed = [
        (workflows.chain.name, "link_5"),
        (workflows.sleepy.name, "b"),
        (workflows.mapped.name, "total"),
        (workflows.mapped.name, "square[]"),
    ]
    for ids_of, names in ((old_ids, old_names), (new_ids, new_names)):
        ran = {
            key: {pool.get(pid, str(pid)) for pid in pids} for key, pids in _ran_on(ids_of).items()
        }
        for key in changed:
            assert ran.get(key, set()) <= names, (key, ran.get(key), names)
        assert ran[(workflows.chain.name, "link_5")], "no changed step ran: nothing to judge"
