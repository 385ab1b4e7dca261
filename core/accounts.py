"""Users and their API tokens: creation, issue, revocation and authentication.

A token is 32 random bytes (``secrets.token_urlsafe``) shown once to whoever asked for
it; only its SHA-256 digest is stored (``user_sessions.token_hash``), so a copy of the
database lets nobody call the API. A plain digest is enough: the token is random, not
a password, so there is nothing to guess from its hash. Every token expires.

These functions take a Session and never commit: the caller (an API route, a CLI
command) decides what one transaction holds.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import (
    AlreadyExists,
    Forbidden,
    InputValidationError,
    TokenNotFound,
    Unauthenticated,
    UserNotFound,
)
from core.models import User, UserSession

TOKEN_PREFIX = "cvy_"
# last_used_at is a hint for operators, not an audit log: writing it on every request
# would turn each read into a write.
LAST_USED_RESOLUTION = timedelta(minutes=1)
MAX_NAME_LENGTH = 200


class Role(StrEnum):
    """What a user may see and do: members their own executions, admins everything."""

    MEMBER = "member"
    ADMIN = "admin"


ACTIVE = "active"


@dataclass(frozen=True)
class IssuedToken:
    """A token as issued: the secret (shown once, never stored) and its stored row."""

    token: str
    session: UserSession


@dataclass(frozen=True)
class Principal:
    """Who is calling: the user and the token they called with."""

    user_id: str
    email: str
    role: Role
    token_id: str

    @property
    def is_admin(self) -> bool:
        """Whether this caller sees and acts on every user's executions."""
        return self.role is Role.ADMIN


def hash_token(token: str) -> str:
    """The stored form of a token: its SHA-256 digest in hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def normalise_email(email: str) -> str:
    """Emails compare case-insensitively; stored lower-case and stripped."""
    if not isinstance(email, str) or "@" not in email.strip():
        raise InputValidationError(f"{email!r} is not an email address")
    return email.strip().lower()


def parse_role(role: str) -> Role:
    """The Role named ``role`` (InputValidationError naming the allowed ones)."""
    try:
        return Role(role)
    except ValueError:
        allowed = ", ".join(r.value for r in Role)
        raise InputValidationError(f"{role!r} is not a role; expected one of: {allowed}") from None


def user_by_email(db: Session, email: str) -> User | None:
    """The user with this email (any case), or None."""
    return db.execute(select(User).where(User.email == normalise_email(email))).scalar_one_or_none()


def create_user(
    db: Session,
    email: str,
    *,
    first_name: str | None = None,
    last_name: str | None = None,
    role: str = Role.MEMBER,
) -> User:
    """Add a user (flushed, not committed); AlreadyExists if the email is taken."""
    address = normalise_email(email)
    parsed = parse_role(role)
    if user_by_email(db, address) is not None:
        raise AlreadyExists(f"a user with email {address!r} already exists")
    user = User(
        email=address, first_name=first_name, last_name=last_name, status=ACTIVE, role=parsed
    )
    db.add(user)
    # A concurrent create of the same email loses here on the unique index; the session
    # helpers translate that IntegrityError to AlreadyExists.
    db.flush()
    return user


def get_user(db: Session, user_id: str) -> User:
    """The user with this id (UserNotFound)."""
    user = db.get(User, user_id)
    if user is None:
        raise UserNotFound(user_id)
    return user


def issue_token(db: Session, user: User, *, ttl: timedelta, name: str | None = None) -> IssuedToken:
    """A new token for ``user`` that expires after ``ttl`` (flushed, not committed)."""
    if ttl <= timedelta(0):
        raise InputValidationError("a token must live for a positive time")
    if name is not None and len(name) > MAX_NAME_LENGTH:
        raise InputValidationError(f"a token name is at most {MAX_NAME_LENGTH} characters")
    if user.status != ACTIVE:
        raise Forbidden(f"user {user.email!r} is {user.status}: no token can be issued")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session = UserSession(
        user_id=user.id,
        token_hash=hash_token(token),
        name=name,
        expires_at=datetime.now(UTC) + ttl,
    )
    db.add(session)
    db.flush()
    return IssuedToken(token, session)


def list_tokens(db: Session, user_id: str) -> list[UserSession]:
    """The tokens of a user, newest first, revoked and expired ones included."""
    query = (
        select(UserSession)
        .where(UserSession.user_id == user_id, UserSession.token_hash.is_not(None))
        .order_by(UserSession.created_at.desc(), UserSession.id.desc())
    )
    return list(db.execute(query).scalars())


def revoke_token(db: Session, token_id: str, *, owner_id: str | None) -> UserSession:
    """Revoke a token (idempotent); ``owner_id`` limits it to that user's tokens (None:
    any user's, for admins). TokenNotFound when it is not one the caller may see."""
    session = db.get(UserSession, token_id)
    if session is None or session.token_hash is None:
        raise TokenNotFound(token_id)
    if owner_id is not None and session.user_id != owner_id:
        raise TokenNotFound(token_id)
    if session.revoked_at is None:
        session.revoked_at = datetime.now(UTC)
        db.flush()
    return session


def authenticate(db: Session, token: str) -> Principal:
    """The caller a token stands for; Unauthenticated if it is unknown, revoked, expired,
    or its user is not active (all with one message, so a caller learns nothing)."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        raise Unauthenticated("the API token is not valid")
    row = db.execute(
        select(UserSession, User)
        .join(User, User.id == UserSession.user_id)
        .where(UserSession.token_hash == hash_token(token))
    ).one_or_none()
    if row is None:
        raise Unauthenticated("the API token is not valid")
    session, user = row
    now = datetime.now(UTC)
    if (
        session.revoked_at is not None
        or session.expires_at is None
        or session.expires_at <= now
        or user.status != ACTIVE
    ):
        raise Unauthenticated("the API token is not valid")
    if session.last_used_at is None or now - session.last_used_at > LAST_USED_RESOLUTION:
        session.last_used_at = now
    return Principal(user.id, user.email, parse_role(user.role), session.id)
