"""conveyor's typed errors, and the one place driver errors become them.

Every error a user can meet derives from ConveyorError; database driver errors are
translated by ``translate_errors()`` (used by the session helpers and the state
manager's transaction runner), the original kept as ``__cause__``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypedDict

from sqlalchemy import exc as sa_exc


class ConveyorError(Exception):
    """conveyor could not do what was asked."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class NotFound(ConveyorError):
    """The object asked for does not exist."""


class ExecutionNotFound(NotFound):
    """No workflow execution has this id."""

    def __init__(self, execution_id: str) -> None:
        super().__init__(f"no workflow execution with id {execution_id!r}")
        self.execution_id = execution_id


class StepNotFound(NotFound):
    """No step of this name exists in the execution."""

    def __init__(self, execution_id: str, step_name: str) -> None:
        super().__init__(f"execution {execution_id!r} has no step named {step_name!r}")
        self.execution_id = execution_id
        self.step_name = step_name


class KeyNotFound(NotFound):
    """No concurrency or rate-limit key of this name: a key exists once a step or
    execution under it was admitted or held."""

    def __init__(self, key: str) -> None:
        super().__init__(
            f"no key {key!r}: a key exists once a step or execution under it was admitted or held"
        )
        self.key = key


class WorkflowNotFound(NotFound):
    """No workflow of this name (and version) is registered."""

    def __init__(
        self, name: str, version: int | None = None, known: list[str] | None = None
    ) -> None:
        what = f"{name!r} version {version}" if version is not None else repr(name)
        hint = (
            f"; registered: {', '.join(known)}"
            if known
            else "; none are registered (set CONVEYOR_WORKFLOW_MODULES to the modules that "
            "define them, in this process's environment)"
        )
        super().__init__(f"no workflow {what}{hint}")
        self.name = name


class DefinitionError(ConveyorError):
    """A workflow definition is not valid (cycle, unknown dependency, bad step)."""


class InputValidationError(ConveyorError, ValueError):
    """The input given is not valid."""

    def __init__(self, message: str | None = None, errors: list[FieldError] | None = None) -> None:
        super().__init__(message)
        # One entry per bad field, for callers that show them apart (the HTTP API's 422).
        self.errors: list[FieldError] = errors or []


class FieldError(TypedDict):
    """One field of an input that was refused: where it is and what is wrong."""

    field: str
    message: str


class InvalidStatus(InputValidationError):
    """A status name that the state machine does not know."""

    def __init__(self, kind: str, value: object, allowed: list[str]) -> None:
        super().__init__(
            f"{value!r} is not a valid {kind} status; expected one of: {', '.join(allowed)}"
        )
        self.value = value


class InvalidTransition(ConveyorError):
    """The state machine does not allow this transition."""

    def __init__(self, kind: str, source: str | None, target: str, detail: str = "") -> None:
        origin = source if source is not None else "(new)"
        message = f"{kind} transition {origin} -> {target} is not allowed"
        super().__init__(f"{message}: {detail}" if detail else message)
        self.source = source
        self.target = target


class StepTimedOut(ConveyorError):
    """A step ran past its soft timeout."""


class StepCrashed(ConveyorError):
    """A step's worker stopped (killed, out of memory) more often than recoveries allow."""

    def __init__(self, step_name: str, worker: str | None, attempts: int, recoveries: int) -> None:
        super().__init__(
            f"step {step_name} was lost with its worker {worker or '(unknown)'} "
            f"{recoveries + 1} time(s) in {attempts} attempt(s); "
            "CONVEYOR_MAX_CRASH_RECOVERIES allows no more"
        )
        self.step_name = step_name
        self.worker = worker
        self.attempts = attempts
        self.recoveries = recoveries


class AlreadyExists(ConveyorError, ValueError):
    """A row with the same unique key already exists."""


class IdempotencyConflict(AlreadyExists):
    """The idempotency key is already used by an execution with other arguments."""


class UserNotFound(NotFound):
    """No user has this id or email."""

    def __init__(self, key: str) -> None:
        super().__init__(f"no user {key!r}")


class TokenNotFound(NotFound):
    """No API token of this user has this id."""

    def __init__(self, token_id: str) -> None:
        super().__init__(f"no API token with id {token_id!r}")


class Unauthenticated(ConveyorError):
    """A valid API token is required: send ``Authorization: Bearer <token>``."""


class Forbidden(ConveyorError):
    """This user may not do this."""


class DatabaseError(ConveyorError):
    """The database refused the operation."""


class TransientDatabaseError(DatabaseError):
    """The database stayed unavailable after every retry (disconnect, deadlock, lock)."""


MIGRATE = "run `conveyor migrate` first (with the same CONVEYOR_DATABASE_URL)"


class SchemaNotMigrated(DatabaseError):
    """The database has no conveyor tables (or is behind): run `conveyor migrate` first."""


class SchemaTooNew(DatabaseError):
    """The database was migrated by a newer conveyor than this one."""


# SQLSTATEs worth retrying: connection exceptions (class 08), serialization failure,
# deadlock, and the server going away under us (admin shutdown, crash, cannot connect now).
_TRANSIENT_SQLSTATE_PREFIXES = ("08",)
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "57P01", "57P02", "57P03", "55P03"})
_SQLITE_TRANSIENT_MESSAGES = ("database is locked", "database table is locked", "busy")
_UNIQUE_VIOLATION = "23505"
_UNDEFINED_TABLE = "42P01"
_FOREIGN_KEY_VIOLATION = "23503"


def _sqlstate(error: sa_exc.DBAPIError) -> str | None:
    state = getattr(error.orig, "sqlstate", None)
    return state if isinstance(state, str) else None


def is_transient(error: BaseException) -> bool:
    """Whether retrying the whole transaction may succeed where this attempt failed."""
    if not isinstance(error, sa_exc.DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    state = _sqlstate(error)
    if state is not None:
        return state in _TRANSIENT_SQLSTATES or state.startswith(_TRANSIENT_SQLSTATE_PREFIXES)
    if isinstance(error, sa_exc.OperationalError):
        # psycopg reports a dropped connection without a SQLSTATE; sqlite3 has none at all.
        message = str(error.orig).lower()
        if any(text in message for text in _SQLITE_TRANSIENT_MESSAGES):
            return True
        return "connection" in message or "server closed" in message
    return False


def translate(error: sa_exc.DBAPIError) -> ConveyorError:
    """The typed error for a driver error (the caller raises it ``from`` the original)."""
    if is_transient(error):
        return TransientDatabaseError(f"database unavailable: {_first_line(error.orig)}")
    unmigrated = _unmigrated(error)
    if unmigrated is not None:
        return unmigrated
    if isinstance(error, sa_exc.IntegrityError):
        state = _sqlstate(error)
        message = _first_line(error.orig)
        if state == _UNIQUE_VIOLATION or "UNIQUE constraint failed" in message:
            return AlreadyExists(f"already exists: {message}")
        if state == _FOREIGN_KEY_VIOLATION or "FOREIGN KEY constraint failed" in message:
            return InputValidationError(f"refers to a row that does not exist: {message}")
        return InputValidationError(f"rejected by a database constraint: {message}")
    return DatabaseError(f"database error: {_first_line(error.orig)}")


def _unmigrated(error: sa_exc.DBAPIError) -> SchemaNotMigrated | None:
    """The hint the CLI gives, for a table that is not there or a SQLite file that is not:
    the same words wherever a user meets an unmigrated database (``enqueue``, the API,
    a worker), not the driver's ``no such table``."""
    message = _first_line(error.orig)
    if _sqlstate(error) == _UNDEFINED_TABLE or message.startswith("no such table"):
        return SchemaNotMigrated(f"the database has no conveyor tables ({message}): {MIGRATE}")
    if isinstance(error, sa_exc.OperationalError) and message == "unable to open database file":
        # core.database opens SQLite files read-write without creating them, so that a
        # mistyped path or a wrong directory is not answered with a new empty file.
        return SchemaNotMigrated(
            "the SQLite database file does not exist or cannot be opened (check "
            f"CONVEYOR_DATABASE_URL and the current directory): {MIGRATE}"
        )
    return None


def _first_line(error: BaseException | None) -> str:
    text = str(error) if error is not None else ""
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


@contextmanager
def translate_errors() -> Iterator[None]:
    """Re-raise driver errors (``DBAPIError``) as typed ConveyorErrors."""
    try:
        yield
    except sa_exc.DBAPIError as error:
        raise translate(error) from error


class ReservedIdempotencyKey(InputValidationError):
    """The idempotency key begins with a prefix only conveyor's schedules may use."""

    def __init__(self, key: str, prefix: str) -> None:
        message = (
            f"idempotency_key {key!r} begins with {prefix!r}, a prefix reserved to the keys "
            "of schedules' ticks; choose another key"
        )
        super().__init__(message, [{"field": "idempotency_key", "message": message}])
        self.key = key
        self.prefix = prefix


class DebouncedIdempotencyKey(InputValidationError):
    """An idempotency key was given with an enqueue of a debounced workflow: the enqueues
    with one debounce key already share one execution, which no key could name."""

    def __init__(self, workflow: str) -> None:
        message = (
            f"workflow {workflow!r} is debounced: enqueues with the same debounce key "
            "already share one execution, so an idempotency key cannot be given"
        )
        super().__init__(
            message,
            [{"field": "idempotency_key", "message": "not allowed for a debounced workflow"}],
        )
        self.workflow = workflow


class OutputNotStorable(ConveyorError):
    """A step's output cannot be stored as it is: it fails the step at once, unretried
    (returning the same value again would be refused again)."""

    def __init__(self, step: str, problem: str) -> None:
        super().__init__(f"the output of step {step!r} cannot be stored: {problem}")
        self.step = step
        self.problem = problem


class WaitTimedOut(ConveyorError):
    """An event wait's timeout passed with no event or signal: the step fails with it
    (then follows its ``Retry``), unless the wait gives ``on_timeout`` a value."""


class ChildFailed(ConveyorError):
    """A child execution ended failed, cancelled or timed out: its parent step fails."""


class WaitNotOpen(InvalidTransition):
    """A signal or wake for a step that is not waiting for one (HTTP 409): the execution
    or the step is named with the status it holds."""

    def __init__(self, what: str, status: str, detail: str = "") -> None:
        ConveyorError.__init__(self, f"{what} is {status}" + (f": {detail}" if detail else ""))
        self.source = status
        self.target = "signalled"
        self.status = status


class MapInputError(ConveyorError):
    """A map step's upstream output is not a list, or holds more items than the map's
    ``max_items``: the map step fails at once (no item is run, none is dropped)."""

    def __init__(
        self,
        step: str,
        over: str,
        *,
        got: str | None = None,
        length: int | None = None,
        limit: int | None = None,
    ) -> None:
        if got is not None:
            message = f"map {step} needs a list from {over}, got {got}"
        else:
            message = (
                f"{over} returned {length:,} items; map {step} allows at most max_items={limit:,}"
            )
        super().__init__(message)
        self.step, self.over, self.got, self.length, self.limit = step, over, got, length, limit


class MapItemsFailed(ConveyorError):
    """More items of a map step failed (after their retries) than its
    ``on_item_failure`` tolerates: the map step fails, its open items are cancelled."""

    def __init__(self, step: str, failed: int, limit: int, index: int, error: str) -> None:
        allowed = "none may fail" if limit == 0 else f"at most {limit} may"
        super().__init__(
            f"map {step}: {failed} item(s) failed ({allowed}); item {index} failed with {error}"
        )
        self.step, self.failed, self.limit, self.index = step, failed, limit, index


class NothingToRetry(InvalidTransition):
    """``retry --failed-items`` on an execution with no failed map step (HTTP 409)."""

    def __init__(self, execution_id: str, detail: str) -> None:
        ConveyorError.__init__(self, f"execution {execution_id}: {detail}")
        self.source = detail
        self.target = "retried"


class NotReplayable(ConveyorError):
    """A recorded step cannot be replayed here: its payloads were cleared, its code is
    not in this process, or its contract changed since it ran (the reason says which)."""

    def __init__(self, execution_id: str, step: str, reason: str) -> None:
        super().__init__(f"cannot replay step {step!r} of execution {execution_id}: {reason}")
        self.execution_id = execution_id
        self.step = step
        self.reason = reason
