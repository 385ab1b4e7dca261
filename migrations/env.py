"""Alembic's environment: migrates the database named by conveyor's settings, or a given one.

Where the database comes from, first match wins:

1. ``config.attributes["connection"]``: a Connection from the caller (tests, tools);
   a transaction the caller already began stays the caller's to commit.
2. ``alembic -x url=...``, or ``sqlalchemy.url`` set on the Config by the caller.
3. ``core.config.get_settings()``: CONVEYOR_DATABASE_URL, default sqlite:///./conveyor.db.

URLs are never printed or logged: they may hold a password.
"""

from __future__ import annotations

from logging.config import fileConfig
from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from pydantic import ValidationError
from sqlalchemy import Connection, Text, create_engine, pool
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL

from core.config import Settings, get_settings
from core.models import Base

config = context.config
target_metadata = Base.metadata

# Types defined by conveyor, rendered in revisions as ``Name(...)`` imported from here,
# so that generated revisions run without hand edits.
CUSTOM_TYPES_MODULE = "core.types"

# Only the alembic command line configures logging from alembic.ini; code that calls
# alembic.command (tests, tools) owns the process's logging and must not have it reset.
if config.config_file_name is not None and config.cmd_opts is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> URL:
    """The URL to migrate: ``-x url=...``, then ``sqlalchemy.url``, then the settings."""
    given = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    try:
        if not given:
            return get_settings().sync_database_url
        # Through Settings, so a given URL gets the drivers CONVEYOR_DATABASE_URL gets.
        return Settings(database_url=given).sync_database_url
    except ValidationError as exc:
        # Only the messages: pydantic's full text repeats the input, password included.
        reasons = "; ".join(str(error["msg"]) for error in exc.errors())
        raise ValueError(f"the database URL is not usable: {reasons}") from None


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Render conveyor's own column types importably; ``False`` leaves the rest to alembic."""
    if type_ != "type":
        return False
    if isinstance(obj, postgresql.JSON) and type(obj.astext_type) is Text:
        # Alembic's own rendering, outside a PostgreSQL autogenerate, writes the default
        # astext_type as a bare, unimported ``Text()``; the default needs no writing.
        autogen_context.imports.add("from sqlalchemy.dialects import postgresql")
        arguments = "none_as_null=True" if obj.none_as_null else ""
        return f"postgresql.{type(obj).__name__}({arguments})"
    if type(obj).__module__ != CUSTOM_TYPES_MODULE:
        return False
    cls = type(obj)
    autogen_context.imports.add(f"from {CUSTOM_TYPES_MODULE} import {cls.__name__}")
    # A TypeDecorator's repr lists its impl's arguments (UTCDateTime(timezone=True));
    # a type equal to its no-argument form is written as that form.
    rendered = repr(obj)
    try:
        bare = repr(cls())
    except TypeError:  # its constructor needs arguments
        return rendered
    return f"{cls.__name__}()" if rendered == bare else rendered


def options(dialect_name: str) -> dict[str, Any]:
    """The context options both modes share."""
    return {
        "target_metadata": target_metadata,
        "compare_type": True,
        "render_item": render_item,
        # SQLite cannot ALTER most things: batch mode copies the table instead.
        "render_as_batch": dialect_name == "sqlite",
    }


def run_migrations_offline() -> None:
    """Write the migrations' SQL to stdout (``alembic upgrade --sql``) for the URL's dialect."""
    url = database_url()
    context.configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **options(url.get_backend_name()),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_on(connection: Connection) -> None:
    """Run the migrations on ``connection``."""
    context.configure(connection=connection, **options(connection.dialect.name))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on the caller's connection, or on one opened for the URL."""
    given = config.attributes.get("connection")
    if given is not None:
        run_on(given)
        return
    # A plain engine, not core.database's: no pool to outlive the command, and no
    # SQLite PRAGMA foreign_keys, under which batch mode's table copies would cascade.
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            run_on(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
