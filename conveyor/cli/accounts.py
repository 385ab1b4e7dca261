"""``conveyor users`` and ``conveyor tokens``: the API's users and their tokens.

The first admin and their first token come from here (the API needs a token to issue
one). A token is printed once; only its hash is stored.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Annotated

import typer

from conveyor.cli.main import JsonOption, app, migrated, reported
from conveyor.cli.render import stderr
from core import accounts
from core.accounts import Role
from core.database import get_database, get_db_session
from core.errors import InputValidationError, UserNotFound

users = typer.Typer(name="users", help="Users of the HTTP API.", no_args_is_help=True)
tokens = typer.Typer(
    name="tokens", help="API tokens (shown once, stored hashed).", no_args_is_help=True
)
app.add_typer(users)
app.add_typer(tokens)

Email = Annotated[str, typer.Argument(help="The user's email address.")]


@users.command("create")
@reported
@migrated
def create_user(
    email: Email,
    name: Annotated[str | None, typer.Option(help="First name.")] = None,
    admin: Annotated[bool, typer.Option("--admin", help="Sees and acts on everything.")] = False,
) -> None:
    """Add a user; prints its id."""
    with get_db_session(commit=True) as db:
        user = accounts.create_user(
            db, email, first_name=name, role=Role.ADMIN if admin else Role.MEMBER
        )
        user_id = user.id
    typer.echo(user_id)


@tokens.command("issue")
@reported
@migrated
def issue_token(
    email: Email,
    name: Annotated[str | None, typer.Option(help="What the token is for.")] = None,
    days: Annotated[
        int | None, typer.Option(min=1, help="Days it lives (default and most: the setting).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Issue a token for a user and print it (it cannot be shown again)."""
    limit = get_database().settings.api_token_ttl_days
    if days is not None and days > limit:
        raise InputValidationError(f"--days is at most {limit} (CONVEYOR_API_TOKEN_TTL_DAYS)")
    with get_db_session(commit=True) as db:
        user = accounts.user_by_email(db, email)
        if user is None:
            raise UserNotFound(email)
        issued = accounts.issue_token(db, user, ttl=timedelta(days=days or limit), name=name)
        document = {
            "id": issued.session.id,
            "token": issued.token,
            "user_id": user.id,
            "expires_at": issued.session.expires_at.isoformat()
            if issued.session.expires_at
            else None,
        }
    if as_json:
        typer.echo(json.dumps(document))
        return
    typer.echo(issued.token)
    stderr().print(
        f"token {document['id']} for {email} expires {document['expires_at']}; "
        "it is shown only now",
        soft_wrap=True,
    )


@tokens.command("revoke")
@reported
@migrated
def revoke_token(token_id: Annotated[str, typer.Argument(help="The token's id.")]) -> None:
    """Revoke a token at once."""
    with get_db_session(commit=True) as db:
        accounts.revoke_token(db, token_id, owner_id=None)
    typer.echo(f"Revoked {token_id}.")
