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
    """Everything conveyor reads from its environment; see README's configuration table."""

    model_config = SettingsConfigDict(
        env_prefix="CONVEYOR_",
        env_file=".env",
        extra="ignore",
        hide_input_in_errors=True,
    )

    database_url: SecretStr = Field(
        default=SecretStr(DEFAULT_DATABASE_URL),
        description="SQLAlchemy URL of the state database (postgresql://... or sqlite:///...).",
    )
    database_pool_size: Annotated[int, Field(ge=1)] = 5
    database_max_overflow: Annotated[int, Field(ge=0)] = 10
    database_pool_timeout: Annotated[float, Field(gt=0)] = 30.0
    database_pool_recycle: Annotated[int, Field(ge=-1)] = 3600
    database_pool_pre_ping: bool = True
    database_null_pool: bool = Field(
        default=False,
        description="Open a connection per session instead of pooling (behind PgBouncer).",
    )
    database_echo: bool = False
    sqlite_busy_timeout_ms: Annotated[int, Field(ge=0)] = 5000
    db_retry_attempts: Annotated[int, Field(ge=1)] = 5
    db_retry_initial_wait: Annotated[float, Field(ge=0)] = 0.05
    db_retry_max_wait: Annotated[float, Field(ge=0)] = 2.0
    max_payload_bytes: Annotated[int, Field(ge=1)] = 1_048_576
    workflow_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated modules whose module-level Workflow objects are registered.",
    )
    broker_url: SecretStr = Field(
        default=SecretStr("filesystem://localhost/"),
        description="Celery broker URL; filesystem:// is the embedded default (no server).",
    )
    broker_folder: str = Field(
        default="./.conveyor-broker",
        description="Folder of the filesystem broker's messages (embedded default only).",
    )
    broker_poll_interval: Annotated[float, Field(gt=0)] = 0.1
    visibility_timeout: Annotated[int, Field(ge=60)] = 3600
    heartbeat_interval: Annotated[float, Field(gt=0)] = 5.0
    stall_timeout: Annotated[float, Field(gt=0)] = 60.0
    continue_max_steps: Annotated[int, Field(ge=0)] = Field(
        default=100,
        description="Steps of one execution a worker runs in a row without the broker.",
    )
    continue_max_seconds: Annotated[float, Field(ge=0)] = Field(
        default=1.0,
        description="Seconds after which a worker stops continuing an execution itself.",
    )
    hold_seconds: Annotated[float, Field(ge=0)] = Field(
        default=0.1,
        description=(
            "Seconds a worker keeps the sibling steps a completion released to run them "
            "itself, one after another, before sending them to the broker (0: never)."
        ),
    )
    max_crash_recoveries: Annotated[int, Field(ge=0)] = Field(
        default=3,
        description="Times a step lost with its worker is run again, apart from its retries.",
    )
    reconcile_interval: Annotated[float, Field(gt=0)] = 5.0
    reconcile_batch: Annotated[int, Field(ge=1)] = 500
    republish_after: Annotated[float, Field(gt=0)] = 120.0
    start_after: Annotated[float, Field(gt=0)] = 30.0
    order: Literal["depth_first", "breadth_first"] = Field(
        default="depth_first",
        description="Steps of running executions before starts of new ones, or arrival order.",
    )
    retry_countdown_max: Annotated[float, Field(ge=0)] = 60.0
    wake_interval: Annotated[float, Field(gt=0)] = Field(
        default=1.0,
        description="Seconds between the waker's passes over due sleeps and wait timeouts.",
    )
    wake_batch: Annotated[int, Field(ge=1)] = Field(
        default=500,
        description="Due waits the waker takes per transaction.",
    )
    max_child_depth: Annotated[int, Field(ge=1, le=64)] = Field(
        default=8,
        description="Levels of child workflows allowed below a root execution.",
    )
    retention_succeeded: timedelta | None = Field(
        default=timedelta(days=30),
        description="How long succeeded executions are kept after they ended (seconds, an "
        "ISO 8601 duration such as P30D, or 'forever').",
    )
    retention_failed: timedelta | None = Field(
        default=timedelta(days=90),
        description="How long failed, cancelled and timed-out executions are kept "
        "(as retention_succeeded).",
    )
    retention_payloads: timedelta | None = Field(
        default=None,
        description="After how long finished executions' inputs, outputs and errors are "
        "cleared, their statuses, timings and history kept (default: forever).",
    )
    prune_interval: Annotated[float, Field(gt=0)] = Field(
        default=600.0, description="Seconds between beat's retention passes (conveyor.prune)."
    )
    prune_batch: Annotated[int, Field(ge=1, le=5000)] = Field(
        default=5000, description="Executions deleted (or cleared) per transaction."
    )
    prune_pause: Annotated[float, Field(ge=0)] = Field(
        default=2.0,
        description="Seconds a retention pass rests between batches, so that a backlog "
        "being pruned leaves the database to the steps (0: none).",
    )
    prune_max_batches: Annotated[int, Field(ge=1)] = Field(
        default=200, description="Batches one retention pass runs at most (the next goes on)."
    )
    event_ttl: Annotated[float, Field(gt=0)] = Field(
        default=7 * 24 * 3600.0,
        description="Seconds an event nobody waits for is kept for a wait to come.",
    )
    schedule_interval: Annotated[float, Field(gt=0)] = 1.0
    default_queue: str = "conveyor"
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="Log lines of worker and beat: Celery's text, or one JSON object a line.",
    )
    tracing: bool = Field(
        default=False,
        description="OpenTelemetry spans of execution starts and step runs (conveyor[otel]).",
    )
    task_sent_events: bool = Field(
        default=False,
        description="Publish Celery's task-sent event with every message (Flower's PENDING).",
    )
    api_token_ttl_days: Annotated[int, Field(ge=1, le=3650)] = Field(
        default=30,
        description="Days an API token lives unless issued with a shorter life.",
    )
    api_max_body_bytes: Annotated[int, Field(ge=1024)] = Field(
        default=2_097_152,
        description="Largest HTTP request body the API reads (larger: 413).",
    )
    dispatcher: str = Field(
        default="worker.app:dispatch_starts",
        description="module:callable that publishes starts of executions created through core.",
    )
    metrics_port: Annotated[int, Field(ge=1, le=65535)] | None = Field(
        default=None,
        description="Port of a worker's Prometheus /metrics (None: no server).",
    )

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
