"""Users: admins add them; everyone reads themselves (``/users/me``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response, status
from sqlalchemy.orm import Session

from conveyor.api import problems
from conveyor.api.auth import Admin, Caller
from conveyor.api.schemas import PathId, UserCreate, UserOut
from core import accounts
from core.database import get_db
from core.errors import UserNotFound

router = APIRouter(prefix="/users", tags=["users"], responses=problems.responses(401, 503))
Db = Annotated[Session, Depends(get_db)]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=UserOut,
    responses=problems.responses(400, 403, 409, 413, 422),
)
def create_user(body: UserCreate, db: Db, _: Admin, response: Response) -> UserOut:
    """Add a user (admins only); 409 when the email is taken."""
    user = accounts.create_user(
        db, body.email, first_name=body.first_name, last_name=body.last_name, role=body.role
    )
    db.commit()
    response.headers["Location"] = f"/users/{user.id}"
    return UserOut.of(user)


@router.get("/me", response_model=UserOut)
def read_me(db: Db, caller: Caller) -> UserOut:
    """The caller."""
    return UserOut.of(accounts.get_user(db, caller.user_id))


@router.get("/{user_id}", response_model=UserOut, responses=problems.responses(404, 422))
def read_user(user_id: PathId, db: Db, caller: Caller) -> UserOut:
    """A user: oneself, or anyone for an admin (404 otherwise)."""
    if not caller.is_admin and user_id != caller.user_id:
        raise UserNotFound(user_id)
    return UserOut.of(accounts.get_user(db, user_id))
