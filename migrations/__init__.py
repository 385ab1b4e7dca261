"""Alembic's migrations of conveyor's schema; the models in core/models.py are the source."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from sqlalchemy import Connection

ALEMBIC_INI = Path(__file__).resolve().parent.parent / "alembic.ini"


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's Config from conveyor's alembic.ini, run on ``connection`` when one is given.

    Without a connection, env.py migrates the database the settings name. A transaction
    already begun on ``connection`` is the caller's to commit.
    """
    config = Config(str(ALEMBIC_INI))
    if connection is not None:
        config.attributes["connection"] = connection
    return config
