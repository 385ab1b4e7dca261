"""Flower, started as the Procfile starts it, refuses requests without its basic auth."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2

from tests.servers import free_port

REPO = Path(__file__).resolve().parents[2]


def _procfile_command(name: str) -> str:
    for line in (REPO / "Procfile").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name} process in the Procfile")


def test_flower_requires_basic_auth(redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
        "CONVEYOR_BROKER_URL": redis_url,
        "CONVEYOR_DATABASE_URL": f"sqlite:///{tmp_path / 'unused.db'}",
        "FLOWER_BASIC_AUTH": "ops:s3cret-for-the-test",
        "FLOWER_PORT": str(port),
    }
    log = tmp_path / "flower.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["bash", "-c", _procfile_command("flower")],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()
            try:
                anonymous = httpx2.get(url, timeout=2)
                break
            except httpx2.TransportError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        assert anonymous.status_code == 401
        wrong = httpx2.get(url, auth=("ops", "guess"), timeout=5)
        assert wrong.status_code == 401
        right = httpx2.get(url, auth=("ops", "s3cret-for-the-test"), timeout=5)
        assert right.status_code == 200
        assert "Flower" in right.text
        assert b"s3cret-for-the-test" not in log.read_bytes()
        token = base64.b64encode(b"ops:s3cret-for-the-test").decode()
        assert token not in log.read_text()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)


def test_flower_will_not_start_without_credentials(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    result = subprocess.run(
        ["bash", "-c", _procfile_command("flower")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "set FLOWER_BASIC_AUTH" in result.stderr
