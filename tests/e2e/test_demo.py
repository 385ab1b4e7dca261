"""``make run``'s demo, as a user runs it: a subprocess in an empty folder, nothing else.

It needs no test database or Redis (it brings its own SQLite and filesystem broker),
so it asks for neither fixture and runs once, not once per backend.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXPECTED = {
    "daily_report": "succeeded",
    "gallery_thumbnails": "succeeded",
    "supplier_sync": "succeeded",
    "charge_order": "failed",
    "invoice_approval": "succeeded",
}
DEMO_TIMEOUT = 90


def _processes_in(folder: Path) -> list[str]:
    """Live processes (Linux /proc) working in ``folder`` or naming it on their command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # it ended while we looked, or is not ours to inspect
            continue
        if state != "Z" and (cwd.startswith(str(folder)) or str(folder) in cmdline):
            found.append(f"{entry.name}: {cmdline}")
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _run_demo(cwd: Path) -> None:
    """Run the demo as ``make run`` does, in ``cwd``, and check what it printed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "conveyor.cli.demo"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
        check=False,
    )
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for workflow, status in EXPECTED.items():
        assert re.search(rf"^\s+{workflow}\s+{status}\s+as expected\b", output, re.M), output
    assert "PaymentDeclined in step charge_card" in output
    assert "skipped: send_receipt" in output
    assert "pull_stock_levels took 3 attempts" in output
    # The approval the demo signalled before its wait existed, then the grace period.
    assert "inv-42 paid (9900 cents), approved by demo@example.com" in output
    assert "polled every 0.1 s" in output
    assert elapsed < 60, f"the demo took {elapsed:.1f}s"

    pids = [int(pid) for pid in re.findall(r"^\s+(?:worker|beat)\s+pid (\d+)", output, re.M)]
    assert len(pids) == 2, output
    assert not [pid for pid in pids if _alive(pid)]
    assert _processes_in(cwd) == []
    assert (cwd / ".conveyor-demo" / "conveyor.db").exists()


@pytest.mark.timeout(DEMO_TIMEOUT + 30)
def test_demo_runs_every_example_to_its_expected_end(tmp_path: Path) -> None:
    _run_demo(tmp_path)


REPEATS = 3


@pytest.mark.timeout(REPEATS * DEMO_TIMEOUT + 30)
def test_demo_run_again_and_again_in_one_folder_ends_as_expected_each_time(
    tmp_path: Path,
) -> None:
    """``make run`` repeated, as a user does: each run starts afresh on the embedded
    broker, and its worker neither dies nor sets a message aside."""
    for _ in range(REPEATS):
        _run_demo(tmp_path)
        worker_log = (tmp_path / ".conveyor-demo" / "worker.log").read_text()
        assert "Unrecoverable error" not in worker_log, worker_log
        assert "undecodable message" not in worker_log, worker_log
        assert list((tmp_path / ".conveyor-demo" / "broker" / "quarantine").iterdir()) == []
