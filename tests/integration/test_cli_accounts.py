"""``conveyor users`` and ``conveyor tokens``: the first admin and their token."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from typer.testing import CliRunner

from conveyor.cli.main import app
from core import accounts
from core.accounts import Role
from core.database import get_db_session
from core.errors import Unauthenticated
from tests.conftest import TestDatabase


def test_an_admin_and_a_token_made_on_the_command_line_authenticate(
    database: TestDatabase,
) -> None:
    runner = CliRunner()
    created = runner.invoke(app, ["users", "create", "Root@Example.com", "--admin"])
    assert created.exit_code == 0, created.output
    user_id = created.stdout.strip()

    issued = runner.invoke(app, ["tokens", "issue", "root@example.com", "--days", "2", "--json"])
    assert issued.exit_code == 0, issued.output
    document = json.loads(issued.stdout)
    assert document["user_id"] == user_id
    expires = datetime.fromisoformat(document["expires_at"])
    assert (
        timedelta(days=2) - timedelta(minutes=1) < expires - datetime.now(UTC) <= timedelta(days=2)
    )
    with get_db_session(commit=True) as db:
        caller = accounts.authenticate(db, document["token"])
        assert (caller.user_id, caller.role) == (user_id, Role.ADMIN)
        # Only the hash is stored: the token itself is nowhere in the table.
        stored = accounts.list_tokens(db, user_id)[0]
        assert stored.token_hash == accounts.hash_token(document["token"])
        assert document["token"] not in repr(stored.__dict__)

    assert runner.invoke(app, ["tokens", "revoke", document["id"]]).exit_code == 0
    with get_db_session() as db:
        try:
            accounts.authenticate(db, document["token"])
        except Unauthenticated:
            pass
        else:
            raise AssertionError("a revoked token still authenticates")


def test_account_commands_refuse_bad_input_with_one_line(database: TestDatabase) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["users", "create", "a@example.com"]).exit_code == 0
    duplicate = runner.invoke(app, ["users", "create", "A@example.com"])
    assert duplicate.exit_code == 1
    assert "a user with email 'a@example.com' already exists" in duplicate.stderr
    unknown = runner.invoke(app, ["tokens", "issue", "nobody@example.com"])
    assert unknown.exit_code == 1
    assert "no user 'nobody@example.com'" in unknown.stderr
    too_long = runner.invoke(app, ["tokens", "issue", "a@example.com", "--days", "999"])
    assert too_long.exit_code == 1
    assert "CONVEYOR_API_TOKEN_TTL_DAYS" in too_long.stderr
