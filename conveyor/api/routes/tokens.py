"""API tokens: issue (the secret is in this one response only), list, revoke."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response, status
from sqlalchemy.orm import Session

from conveyor.api import problems
from conveyor.api.auth import Caller
from conveyor.api.schemas import NO_NUL, PathId, TokenCreate, TokenIssued, TokenOut
from conveyor.api.services import Conveyor
from core import accounts
from core.database import get_db
from core.errors import Forbidden, InputValidationError

router = APIRouter(prefix="/tokens", tags=["tokens"], responses=problems.responses(401, 503))
Db = Annotated[Session, Depends(get_db)]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=TokenIssued,
    responses=problems.responses(400, 403, 404, 413, 422),
)
def issue_token(
    body: TokenCreate, db: Db, caller: Caller, conveyor: Conveyor, response: Response
) -> TokenIssued:
    """Issue a token for the caller (or, for an admin, for ``user_id``)."""
    owner_id = body.user_id or caller.user_id
    if owner_id != caller.user_id and not caller.is_admin:
        raise Forbidden("only an admin issues tokens for other users")
    limit = conveyor.engine.settings.api_token_ttl_days
    days = body.expires_in_days if body.expires_in_days is not None else limit
    if days > limit:
        raise InputValidationError(
            f"expires_in_days is at most {limit} (CONVEYOR_API_TOKEN_TTL_DAYS)",
            [{"field": "expires_in_days", "message": f"must be at most {limit}"}],
        )
    user = accounts.get_user(db, owner_id)
    issued = accounts.issue_token(db, user, ttl=timedelta(days=days), name=body.name)
    db.commit()
    response.headers["Location"] = f"/tokens/{issued.session.id}"
    response.headers["Cache-Control"] = "no-store"
    return TokenIssued(token=issued.token, **TokenOut.of(issued.session).model_dump())


@router.get("", response_model=list[TokenOut], responses=problems.responses(403, 422))
def list_tokens(
    db: Db,
    caller: Caller,
    user_id: Annotated[
        str | None, Query(max_length=36, pattern=NO_NUL, description="Admins only.")
    ] = None,
) -> list[TokenOut]:
    """The caller's tokens (an admin may name another user), newest first."""
    owner_id = user_id or caller.user_id
    if owner_id != caller.user_id and not caller.is_admin:
        raise Forbidden("only an admin lists other users' tokens")
    return [TokenOut.of(t) for t in accounts.list_tokens(db, owner_id)]


@router.delete(
    "/{token_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=problems.responses(403, 404, 422),
)
def revoke_token(token_id: PathId, db: Db, caller: Caller) -> Response:
    """Revoke a token at once (idempotent); the caller's own, or any for an admin."""
    accounts.revoke_token(db, token_id, owner_id=None if caller.is_admin else caller.user_id)
    db.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
