"""The API under hostile input: SQL injection, NUL bytes and oversize values in every
string it takes, tokens that must not work, and secrets that must never be shown.

Each string field of each request body, query and path is sent hostile values: they
are refused (422 naming the field, 404, 413) or stored inert, read back byte for byte,
and every table is still there afterwards. See docs/api-security.md.
"""

from __future__ import annotations

import hashlib
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlsplit

import httpx2 as httpx
import pytest
from sqlalchemy import create_engine, inspect, make_url, text, update
from sqlalchemy.pool import NullPool

from conveyor.api.app import create_app
from core.accounts import Role
from core.config import Settings
from core.database import get_db_session
from core.models import Base, User
from tests.conftest import TestDatabase
from tests.e2e.conftest import e2e_registry
from tests.helpers.api import client, serve, user_with_token
from worker.app import create_app as create_celery_app

INJECTIONS = [
    "'; DROP TABLE users; --",
    '" OR 1=1 --',
    "1; DELETE FROM workflow_executions WHERE '1'='1",
    "Robert'); DROP TABLE user_sessions;--",
    "%' OR '%'='",
    "\\'; SELECT pg_sleep(5); --",
    "$$; DROP TABLE execution_events; $$",
    "ünïcødé ✓ \U0001d518\U0001d52b \U0001f600 \u202e\u200b",  # astral, RTL override, ZWSP
]
# Within every field's limit (the shortest is 200 characters) but far from short.
LONG_UNICODE = ("\U0001d518ñí©ødé ✓ '\" -- " * 40)[:200]
STORED = [*INJECTIONS, LONG_UNICODE]
NUL = "before\x00after"


def refused(response: httpx.Response, field: str) -> None:
    """``response`` is a 422 whose problem names ``field``."""
    assert response.status_code == 422, (field, response.status_code, response.text)
    assert response.headers["content-type"] == "application/problem+json"
    fields = {e["field"] for e in response.json()["errors"]}
    assert field in fields, (field, response.json())


def tables_intact(database: TestDatabase) -> None:
    """Every table of the schema still exists."""
    engine = create_engine(database.url, poolclass=NullPool)
    try:
        assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_hostile_strings_in_bodies_are_stored_inert_or_refused_naming_the_field(
    database: TestDatabase, admin: httpx.Client
) -> None:
    for n, value in enumerate(STORED):
        # users: names stored as given; an email with the payload in its local part
        local = value.replace(" ", "_").replace("@", "_")[:60]
        email = f"{local}{n}@example.com"
        created = admin.post(
            "/users", json={"email": email, "first_name": value, "last_name": value}
        )
        assert created.status_code == 201, (value, created.text)
        user = admin.get(f"/users/{created.json()['id']}").json()
        assert (user["email"], user["first_name"], user["last_name"]) == (
            email.lower(),
            value,
            value,
        )

        # tokens: the name
        issued = admin.post("/tokens", json={"name": value})
        assert issued.status_code == 201, (value, issued.text)
        listed = {t["id"]: t for t in admin.get("/tokens").json()}
        assert listed[issued.json()["id"]]["name"] == value

        # executions: the idempotency key, the input (keys and values), the cancel reason
        # (broken declares no input model, so its input is stored as sent)
        body = {"workflow": "broken", "input": {"start": n, value: [value]}}
        enqueued = admin.post("/executions", json={**body, "idempotency_key": value})
        assert enqueued.status_code == 201, (value, enqueued.text)
        execution = enqueued.json()
        assert execution["idempotency_key"] == value
        assert execution["input"] == {"start": n, value: [value]}
        again = admin.post("/executions", json={**body, "idempotency_key": value})
        assert again.status_code == 200
        assert again.json()["execution_id"] == execution["execution_id"]
        path = f"/executions/{execution['execution_id']}"
        assert admin.post(f"{path}/cancel", json={"reason": value}).status_code == 200
        reasons = [e["reason"] for e in admin.get(path).json()["events"]]
        assert f"{value} (by root@example.com)" in reasons

        # Strings that name something: unknown, so refused, never run as SQL.
        refused(admin.post("/executions", json={"workflow": value}), "workflow")
        for role in (value, "admin' --"):
            refused(admin.post("/users", json={"email": f"x{n}@example.com", "role": role}), "role")
        unknown_user = admin.post("/tokens", json={"user_id": value[:36]})
        assert unknown_user.status_code == 404, unknown_user.text

    tables_intact(database)


def test_hostile_strings_in_queries_and_paths_find_nothing_and_break_nothing(
    database: TestDatabase, admin: httpx.Client
) -> None:
    for value in STORED:
        for params in ({"workflow": value}, {"workflow": value, "status": "pending"}):
            listing = admin.get("/executions", params=params)
            assert listing.json() == {"items": [], "next_cursor": None}, listing.text
        refused(admin.get("/executions", params={"cursor": value}), "cursor")
        refused(admin.get("/executions", params={"status": value}), "status.0")
        refused(admin.get("/executions", params={"created_after": value}), "created_after")
        assert admin.get("/tokens", params={"user_id": value[:36]}).json() == []

        segment = quote(value, safe="")
        for method, path in (
            ("GET", f"/executions/{segment}"),
            ("POST", f"/executions/{segment}/cancel"),
            ("POST", f"/executions/{segment}/retry"),
            ("GET", f"/users/{segment}"),
            ("DELETE", f"/tokens/{segment}"),
            ("GET", f"/workflows/{segment}"),
        ):
            response = admin.request(method, path)
            # An id longer than ours is refused as such; a shorter one names nothing.
            assert response.status_code in (404, 422), (method, path, response.text)
            assert response.headers["content-type"] == "application/problem+json"
    not_allowed = admin.put("/executions")
    assert not_allowed.status_code == 405
    assert not_allowed.headers["allow"] == "GET, POST"
    tables_intact(database)


def test_nul_bytes_are_refused_naming_the_field_not_a_server_error(
    database: TestDatabase, admin: httpx.Client
) -> None:
    execution = admin.post("/executions", json={"workflow": "linear", "input": {"start": 1}})
    path = f"/executions/{execution.json()['execution_id']}"
    me = admin.get("/users/me").json()["id"]

    refused(admin.post("/users", json={"email": f"a{NUL}@example.com"}), "email")
    refused(admin.post("/users", json={"email": "b@example.com", "first_name": NUL}), "first_name")
    refused(admin.post("/users", json={"email": "c@example.com", "last_name": NUL}), "last_name")
    refused(admin.post("/tokens", json={"name": NUL}), "name")
    refused(admin.post("/tokens", json={"user_id": NUL}), "user_id")
    refused(admin.post("/executions", json={"workflow": NUL}), "workflow")
    refused(
        admin.post("/executions", json={"workflow": "linear", "idempotency_key": NUL}),
        "idempotency_key",
    )
    # JSON input: a NUL in a value or a key (PostgreSQL's JSONB stores neither).
    for payload in ({"start": 1, "note": NUL}, {"start": 1, NUL: 1}, {"start": 1, "l": [[NUL]]}):
        refused(admin.post("/executions", json={"workflow": "broken", "input": payload}), "input")
    refused(admin.post(f"{path}/cancel", json={"reason": NUL}), "reason")
    refused(admin.get("/executions", params={"workflow": NUL}), "workflow")
    refused(admin.get("/executions", params={"cursor": NUL}), "cursor")
    refused(admin.get("/tokens", params={"user_id": NUL}), "user_id")
    # A well-formed cursor that smuggles a NUL into the id it names.
    forged = "WyIyMDMwLTAxLTAxVDAwOjAwOjAwKzAwOjAwIiwgIlx1MDAwMCJd"
    refused(admin.get("/executions", params={"cursor": forged}), "cursor")
    for method, route in (
        ("GET", "/executions/{}"),
        ("POST", "/executions/{}/cancel"),
        ("POST", "/executions/{}/retry"),
        ("GET", "/users/{}"),
        ("DELETE", "/tokens/{}"),
        ("GET", "/workflows/{}"),
    ):
        response = admin.request(method, route.format(quote(NUL, safe="")))
        assert response.status_code == 422, (route, response.text)
    # Nothing was written by any refused request.
    assert [e["execution_id"] for e in admin.get("/executions").json()["items"]] == [
        execution.json()["execution_id"]
    ]
    assert [t["user_id"] for t in admin.get("/tokens").json()] == [me]
    tables_intact(database)


def test_oversize_values_are_refused(database: TestDatabase, admin: httpx.Client) -> None:
    huge = "é" * 10_000
    for path, body, field in (
        ("/users", {"email": f"{huge}@example.com"}, "email"),
        ("/users", {"email": "a@example.com", "first_name": huge}, "first_name"),
        ("/users", {"email": "a@example.com", "last_name": huge}, "last_name"),
        ("/tokens", {"name": huge}, "name"),
        ("/tokens", {"user_id": huge}, "user_id"),
        ("/executions", {"workflow": huge}, "workflow"),
        ("/executions", {"workflow": "linear", "idempotency_key": huge}, "idempotency_key"),
    ):
        refused(admin.post(path, json=body), field)
    for params, field in (({"workflow": huge}, "workflow"), ({"cursor": huge}, "cursor")):
        refused(admin.get("/executions", params=params), field)
    assert admin.get(f"/executions/{'x' * 37}").status_code == 422
    # A body over CONVEYOR_API_MAX_BODY_BYTES is refused before it is read.
    big = admin.post(
        "/executions", json={"workflow": "linear", "input": {"start": 1, "pad": huge * 300}}
    )
    assert big.status_code == 413
    assert admin.get("/executions").json()["items"] == []
    tables_intact(database)


def test_tokens_of_deactivated_users_malformed_headers_and_query_strings_are_refused(
    database: TestDatabase, api_url: str
) -> None:
    user_id, token = user_with_token("gone@example.com")
    with client(api_url, token) as http:
        assert http.get("/users/me").status_code == 200
    with client(api_url, None) as anonymous:
        for header in (
            f"Basic {token}",
            token,
            "Bearer",
            f"Bearer {token} extra",
            f"Bearer {token[:-1]}",
            f"Bearer {token}x",
            "Bearer cvy_" + "a" * 5000,
        ):
            response = anonymous.get("/users/me", headers={"Authorization": header})
            assert response.status_code == 401, (header[:40], response.text)
            assert response.headers["www-authenticate"] == "Bearer"
        # A token is never read from the URL, where access logs and proxies keep it.
        for name in ("token", "access_token", "api_key", "authorization"):
            assert anonymous.get("/users/me", params={name: token}).status_code == 401

    with get_db_session(commit=True) as db:
        db.execute(update(User).where(User.id == user_id).values(status="disabled"))
    with client(api_url, token) as http:
        response = http.get("/users/me")
        assert response.status_code == 401
        assert response.json()["detail"] == "the API token is not valid"


@pytest.fixture
def secret_role(database: TestDatabase, postgres_admin_url: Any) -> Iterator[tuple[str, str]]:
    """A login role with a password, owning the test database: (its URL, the password)."""
    password = "db-pw-" + hashlib.sha256(database.url.encode()).hexdigest()[:24]
    role = "conveyor_secret_" + make_url(database.url).database.rsplit("_", 1)[-1]  # type: ignore[union-attr]
    engine = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with engine.connect() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{password}'"))
    url = make_url(database.url).set(username=role, password=password)
    try:
        yield url.render_as_string(hide_password=False), password
    finally:
        with engine.connect() as conn:
            conn.execute(text(f"DROP ROLE IF EXISTS {role}"))
        engine.dispose()


@pytest.mark.postgresql_only
def test_no_secret_reaches_a_log_record_or_a_response_body(
    database: TestDatabase,
    redis_url: str,
    secret_role: tuple[str, str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    database_url, db_password = secret_role
    broker_password = "broker-pw-" + db_password[-12:]
    unreachable_url = make_url(database_url).set(port=1).render_as_string(hide_password=False)
    options: dict[str, Any] = {
        "broker_url": f"redis://default:{broker_password}@{urlsplit(redis_url).netloc}/0",
        "db_retry_initial_wait": 0.01,
        "db_retry_max_wait": 0.05,
    }
    app = create_celery_app(Settings(database_url=database_url, **options), e2e_registry())
    down = create_celery_app(Settings(database_url=unreachable_url, **options), e2e_registry())
    caplog.set_level(logging.DEBUG)
    admin_id, admin_token = user_with_token("root@example.com", Role.ADMIN)
    bodies: list[str] = []
    secrets = {admin_token, hashlib.sha256(admin_token.encode()).hexdigest()}
    forged = "cvy_" + "f" * 43
    access = {"log_level": "debug", "log_config": None, "access_log": True}

    with serve(create_app(app), **access) as url, serve(create_app(down), **access) as down_url:
        with client(url, admin_token) as admin:
            issued = admin.post("/tokens", json={"name": "ci"}).json()
            secrets |= {issued["token"], hashlib.sha256(issued["token"].encode()).hexdigest()}
            bodies.append(admin.get("/tokens").text)
            bodies.append(admin.post("/users", json={"email": "m@example.com"}).text)
            # Published through the broker URL that holds its password.
            enqueued = admin.post("/executions", json={"workflow": "quick"})
            assert enqueued.status_code == 201, enqueued.text
            bodies.append(enqueued.text)
            bodies.append(admin.get("/executions").text)
            bodies.append(admin.delete(f"/tokens/{issued['id']}").text)
        with client(url, issued["token"]) as revoked, client(url, forged) as forged_client:
            bodies.append(revoked.get("/users/me").text)
            bodies.append(forged_client.get("/users/me").text)
        with client(url, None) as anonymous:
            # A token sent in a URL is refused, and the access log, which records URLs
            # as sent, shows it redacted.
            # (Sent with urllib: the test's own HTTP client logs the URLs it requests.)
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{url}/users/me?token={admin_token}", timeout=30)
            assert refused.value.code == 401
            bodies.append(refused.value.read().decode())
            bodies.append(anonymous.get("/users/me").text)
            bodies.append(anonymous.get("/readyz").text)

        # The database unreachable: 503, naming no host, statement or password.
        with client(down_url, admin_token) as admin:
            unavailable = admin.get("/executions")
            assert unavailable.status_code == 503, unavailable.text
            bodies.append(unavailable.text)
            bodies.append(admin.get("/healthz").text)

        # An unexpected error in a route: a bare 500, its traceback only in the log.
        def fail(*args: object, **kwargs: object) -> None:
            raise RuntimeError("SELECT token_hash FROM user_sessions -- unexpected")

        monkeypatch.setattr("core.executions.page_executions", fail)
        with client(url, admin_token) as admin:
            crashed = admin.get("/executions")
        assert crashed.status_code == 500
        assert crashed.headers["content-type"] == "application/problem+json"
        assert crashed.json() == {
            "type": "about:blank",
            "title": "Internal Server Error",
            "status": 500,
            "detail": "the server could not complete the request",
        }
        bodies.append(unavailable.text + crashed.text)

    secrets |= {forged, db_password, broker_password}
    records = caplog.records
    assert any(r.name == "uvicorn.access" for r in records), "the access log was not captured"
    assert any(r.name == "conveyor.api.problems" and r.exc_info for r in records), (
        "no 500 was logged"
    )
    logged = "\n".join(f"{r.name} {r.getMessage()} {caplog.handler.format(r)}" for r in records)
    assert "token=cvy_***" in logged, "the token sent in a URL was not logged redacted"
    for secret in secrets:
        assert secret not in logged, f"a secret ({secret[:8]}...) was logged"
        for body in bodies:
            assert secret not in body, f"a secret ({secret[:8]}...) is in a response: {body}"
    for body in bodies:
        assert "Traceback" not in body
        assert "SELECT" not in body
        assert "postgresql" not in body
        assert "redis://" not in body
    assert admin_id
