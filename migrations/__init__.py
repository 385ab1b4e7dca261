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
    # alembic.ini sits beside the package in a checkout (the alembic command reads it);
    # an installed conveyor has only the package, so the scripts are named directly.
    config = Config(str(ALEMBIC_INI)) if ALEMBIC_INI.exists() else Config()
    config.set_main_option("script_location", str(Path(__file__).resolve().parent))
    if connection is not None:
        config.attributes["connection"] = connection
    return config
