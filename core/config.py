"""Settings read from the environment (prefix ``CONVEYOR_``), through one cached accessor."""

from __future__ import annotations

from datetime import timedelta
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import URL, make_url

DEFAULT_DATABASE_URL = "sqlite:///./conveyor.db"


def _sync_url(url: URL) -> URL:
    """Normalise a user's URL to the drivers conveyor ships: psycopg 3 and sqlite3."""
    backend = url.get_backend_name()
    if backend in ("postgresql", "postgres"):
        return url.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        return url.set(drivername="sqlite")
    raise ValueError(
        f"unsupported database {url.drivername!r}: conveyor runs on postgresql or sqlite"
    )


def async_url_for(url: URL) -> URL:
    """The async twin of a sync URL: psycopg 3 serves both; SQLite goes through aiosqlite."""
    if url.get_backend_name() == "sqlite":
        return url.set(drivername="sqlite+aiosqlite")
    return url.set(drivername="postgresql+psycopg")


class Settings(BaseSettings):
    """Everything conveyor reads from its environment: each field is `CONVEYOR_<NAME>`, and
    its docstring (shown on the documentation site's configuration page) says what it does."""

    model_config = SettingsConfigDict(
        env_prefix="CONVEYOR_",
        env_file=".env",
        extra="ignore",
        hide_input_in_errors=True,
        # Each field's docstring is its description: the configuration page of the
        # documentation site is made from them.
        use_attribute_docstrings=True,
    )

    database_url: SecretStr = SecretStr(DEFAULT_DATABASE_URL)
    """State database; `postgresql://user:pass@host/db` in production (psycopg 3)."""
    database_pool_size: Annotated[int, Field(ge=1)] = 5
    """Connections kept per process."""
    database_max_overflow: Annotated[int, Field(ge=0)] = 10
    """Extra connections under load."""
    database_pool_timeout: Annotated[float, Field(gt=0)] = 30.0
    """Seconds to wait for a pooled connection."""
    database_pool_recycle: Annotated[int, Field(ge=-1)] = 3600
    """Seconds before a connection is replaced."""
    database_pool_pre_ping: bool = True
    """Test connections of the session helpers (`get_db`, `get_db_session`, ...) before
    use; conveyor's own transactions never ping: a dropped connection re-runs them.
    """
    database_null_pool: bool = False
    """No pooling (behind PgBouncer)."""
    database_echo: bool = False
    """Log every SQL statement."""
    sqlite_busy_timeout_ms: Annotated[int, Field(ge=0)] = 5000
    """How long SQLite writers wait for the lock."""
    db_retry_attempts: Annotated[int, Field(ge=1)] = 5
    """Attempts of a transaction after transient errors."""
    db_retry_initial_wait: Annotated[float, Field(ge=0)] = 0.05
    """First backoff, seconds (exponential, full jitter)."""
    db_retry_max_wait: Annotated[float, Field(ge=0)] = 2.0
    """Longest backoff, seconds."""
    max_payload_bytes: Annotated[int, Field(ge=1)] = 1_048_576
    """Largest input or step output, as JSON."""
    workflow_modules: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Comma-separated modules holding your workflows."""
    broker_url: SecretStr = SecretStr("filesystem://localhost/")
    """Celery broker; `redis://host:6379/0` in production."""
    broker_folder: str = "./.conveyor-broker"
    """Message folder of the embedded broker (`queue/`, `control/`, `processed/`, and
    `quarantine/` for message files that could not be decoded).
    """
    broker_poll_interval: Annotated[float, Field(gt=0)] = 0.1
    """How often the embedded broker looks for messages, seconds."""
    visibility_timeout: Annotated[int, Field(ge=60)] = 3600
    """Redis redelivers unacknowledged messages after this; raised above the longest step
    `timeout`.
    """
    heartbeat_interval: Annotated[float, Field(gt=0)] = 5.0
    """Seconds between a worker process's heartbeats."""
    stall_timeout: Annotated[float, Field(gt=0)] = 60.0
    """A running step with no heartbeat for this long while the database was reachable is
    re-run (or failed); keep it at least 4 times `CONVEYOR_RECONCILE_INTERVAL`.
    """
    continue_max_steps: Annotated[int, Field(ge=0)] = 100
    """Steps of one execution a worker runs in a row itself, without a broker round trip
    (0: never).
    """
    continue_max_seconds: Annotated[float, Field(ge=0)] = 1.0
    """Checked after each step, its run included: once this long has passed, the next step
    goes through the broker (other work and priorities get their turn).
    """
    hold_seconds: Annotated[float, Field(ge=0)] = 0.1
    """A fan-out: the worker that continues one released step holds its siblings (queued,
    no message) and runs them itself one after another; whatever it has not started this
    long after the hold goes to the broker, even while a step still runs (0: never
    hold).
    """
    max_crash_recoveries: Annotated[int, Field(ge=0)] = 3
    """Times a step lost with its worker is run again, apart from its retries."""
    reconcile_interval: Annotated[float, Field(gt=0)] = 5.0
    """Seconds between reconciler passes (beat)."""
    reconcile_batch: Annotated[int, Field(ge=1)] = 500
    """Most rows each part of a pass handles."""
    republish_after: Annotated[float, Field(gt=0)] = 120.0
    """A queued step unclaimed this long is published again; each further re-send waits
    twice as long, up to 8 times.
    """
    start_after: Annotated[float, Field(gt=0)] = 30.0
    """A pending execution whose last start message is this old gets it again; each further
    re-send waits twice as long, up to 8 times (the count starts again when a retry makes it
    pending again); a concurrency slot that frees with nobody to admit into it is filled
    within this long.
    """
    order: Literal["depth_first", "breadth_first"] = "depth_first"
    """`depth_first`: steps of running executions go ahead of starting new ones (a burst
    finishes in order); `breadth_first`: arrival order.
    """
    retry_countdown_max: Annotated[float, Field(ge=0)] = 60.0
    """Retries due sooner are published with a countdown; later ones by the reconciler."""
    wake_interval: Annotated[float, Field(gt=0)] = 1.0
    """Seconds between the waker's passes over due sleeps and wait timeouts (beat's
    `conveyor.wake`).
    """
    wake_batch: Annotated[int, Field(ge=1)] = 500
    """Due waits the waker takes per transaction."""
    max_child_depth: Annotated[int, Field(ge=1, le=64)] = 8
    """Levels of child workflows allowed below a root execution: deeper nesting is refused
    at registration (`DefinitionError`) and, should it happen, fails the node at run
    time.
    """
    retention_succeeded: timedelta | None = timedelta(days=30)
    """How long succeeded executions are kept after they ended: seconds, ISO 8601 (`P30D`)
    or `forever` (a workflow's `Retention` wins).
    """
    retention_failed: timedelta | None = timedelta(days=90)
    """The same for failed, cancelled and timed-out executions."""
    retention_payloads: timedelta | None = None
    """After how long finished executions' inputs, outputs and errors are cleared."""
    prune_interval: Annotated[float, Field(gt=0)] = 600.0
    """Seconds between beat's retention passes."""
    prune_batch: Annotated[int, Field(ge=1, le=5000)] = 5000
    """Executions deleted (or cleared) per transaction, at most 5,000."""
    prune_pause: Annotated[float, Field(ge=0)] = 2.0
    """Seconds a retention pass rests between full batches, leaving the database to the
    steps while it works through a backlog (0: none).
    """
    prune_max_batches: Annotated[int, Field(ge=1)] = 200
    """Batches one pass runs at most (the next pass goes on)."""
    event_ttl: Annotated[float, Field(gt=0)] = 7 * 24 * 3600.0
    """Seconds an event nobody waits for is kept for a wait to come (7 days), then dropped
    by the reconciler.
    """
    schedule_interval: Annotated[float, Field(gt=0)] = 1.0
    """Seconds between passes that fire due schedules (beat)."""
    default_queue: str = "conveyor"
    """Celery queue of conveyor's tasks."""
    log_format: Literal["text", "json"] = "text"
    """`text`: Celery's log lines, with `[execution_id=... workflow=... step=...
    attempt=...]` on lines logged while a step runs; `json`: one JSON object a line with
    those as fields (see Logs).
    """
    tracing: bool = False
    """OpenTelemetry spans of execution starts and step runs, linked across the broker
    (needs `conveyor[otel]`; see Traces).
    """
    task_sent_events: bool = False
    """Publish Celery's task-sent event with every message (one more Redis publish each;
    Flower shows tasks from "received" without it).
    """
    api_token_ttl_days: Annotated[int, Field(ge=1, le=3650)] = 30
    """Days an API token lives (a token can be issued with a shorter life, never a longer
    one).
    """
    api_max_body_bytes: Annotated[int, Field(ge=1024)] = 2_097_152
    """Largest HTTP request body the API reads; larger ones get 413."""
    dispatcher: str = "worker.app:dispatch_starts"
    """What starts executions created through `core` alone (empty: the reconciler does)."""
    metrics_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    """Port on which a worker serves Prometheus metrics at `/metrics` (1-65535; none: no
    server; see Metrics).
    """

    @field_validator("retention_succeeded", "retention_failed", "retention_payloads", mode="before")
    @classmethod
    def _forever(cls, value: Any) -> Any:
        """'forever' (or 'never', 'none', empty) keeps for ever: None."""
        if isinstance(value, str) and value.strip().lower() in ("forever", "never", "none", ""):
            return None
        return value

    @field_validator("retention_succeeded", "retention_failed", "retention_payloads")
    @classmethod
    def _not_negative(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value < timedelta(0):
            raise ValueError("must not be negative")
        return value

    @field_validator("workflow_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _blank_port_is_none(cls, value: object) -> object:
        # CONVEYOR_METRICS_PORT= (set but empty, as compose files leave it) means off.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("database_url", mode="before")
    @classmethod
    def _normalise_database_url(cls, value: object) -> object:
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if not isinstance(raw, str):
            return value
        try:
            parsed = make_url(raw)
        except Exception as exc:  # sqlalchemy raises ArgumentError with the bad URL inside
            raise ValueError("CONVEYOR_DATABASE_URL is not a valid database URL") from exc
        return SecretStr(_sync_url(parsed).render_as_string(hide_password=False))

    @property
    def sync_database_url(self) -> URL:
        """URL for sync engines (workers, CLI, FastAPI's get_db)."""
        return make_url(self.database_url.get_secret_value())

    @property
    def async_database_url(self) -> URL:
        """URL for async engines (async producers, get_async_db_session)."""
        return async_url_for(self.sync_database_url)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once; tests call ``get_settings.cache_clear()``."""
    return Settings()
