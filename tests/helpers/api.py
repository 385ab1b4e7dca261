"""The HTTP API served for real (uvicorn on a free port, in a thread), and its users."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import httpx2 as httpx
import uvicorn
from fastapi import FastAPI

from core import accounts
from core.accounts import Role
from core.database import get_db_session
from tests.servers import free_port


@contextmanager
def serve(app: FastAPI, **options: Any) -> Iterator[str]:
    """Serve ``app`` over HTTP on 127.0.0.1 for the block; yields its base URL.

    ``options`` go to ``uvicorn.Config`` (e.g. ``log_level="debug", log_config=None`` to
    let the access log reach the root logger and pytest's caplog)."""
    port = free_port()
    config: dict[str, Any] = {"log_level": "warning", "lifespan": "off", **options}
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **config))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped while starting"
        assert time.monotonic() < deadline, "uvicorn did not start in 10 s"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def user_with_token(email: str, role: Role = Role.MEMBER, days: int = 1) -> tuple[str, str]:
    """A new user of the process's database and a token of theirs: (user id, token)."""
    with get_db_session(commit=True) as db:
        user = accounts.create_user(db, email, role=role)
        issued = accounts.issue_token(db, user, ttl=timedelta(days=days))
        return user.id, issued.token


def client(base_url: str, token: str | None) -> httpx.Client:
    """An HTTP client of the API, sending ``token`` as a bearer token when given."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=base_url, headers=headers, timeout=30)


def poll(http: httpx.Client, path: str, until: set[str], timeout: float = 30) -> dict[str, object]:
    """GET ``path`` until its ``status`` is one of ``until``; the last body."""
    deadline = time.monotonic() + timeout
    while True:
        response = http.get(path)
        assert response.status_code == 200, response.text
        body: dict[str, object] = response.json()
        if body["status"] in until:
            return body
        assert time.monotonic() < deadline, f"{path} still {body['status']} after {timeout}s"
        time.sleep(0.05)
