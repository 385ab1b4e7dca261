"""The harness itself: real servers answer, and each test gets its own empty database."""

from __future__ import annotations

import redis
from sqlalchemy import func, select

from core.database import get_db_session
from core.models import User


def test_redis_answers(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        client.set("conveyor:harness", "ok")
        assert client.get("conveyor:harness") == b"ok"
    finally:
        client.close()


def test_each_test_gets_an_empty_database(database) -> None:  # type: ignore[no-untyped-def]
    with get_db_session(commit=True) as db:
        assert db.scalar(select(func.count()).select_from(User)) == 0
        db.add(User(email="only-here@example.com"))
    with get_db_session() as db:
        assert db.scalar(select(func.count()).select_from(User)) == 1
