"""The database restarting mid-run loses no transition; workers recover by themselves."""

from __future__ import annotations

import pytest

from tests.conftest import TestDatabase
from tests.e2e import workflows
from tests.e2e.conftest import wait_for
from tests.helpers.state import events
from tests.servers import PostgresServer
from worker.app import ConveyorCelery
from worker.producer import enqueue


@pytest.mark.postgresql_only
def test_postgres_restart_mid_step(
    database: TestDatabase, worker: ConveyorCelery, postgres_server: PostgresServer | None
) -> None:
    if postgres_server is None:
        pytest.fail("this test restarts the server: run it on the harness's own PostgreSQL")
    workflows.MIDDLE_STARTED.clear()
    execution_id = enqueue("patient", app=worker)
    assert workflows.MIDDLE_STARTED.wait(timeout=30)
    postgres_server.restart()  # every pooled connection dies under the worker
    execution = wait_for(execution_id, timeout=90)
    assert execution.status == "succeeded"
    assert execution.output_data == {"end": 3}
    for step in ("begin", "middle", "end"):
        assert workflows.CALLS[(execution_id, step)] == 1
        assert events(execution_id).count((step, "running", "succeeded")) == 1
