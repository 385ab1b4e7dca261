"""The hot path's PostgreSQL statements keep the SQL text psycopg and SQLAlchemy can cache.

A step's claim and completion run thousands of times a second across a fleet. psycopg
converts a query's ``%(name)s`` placeholders once per distinct text, but only for texts
of at most ``MAX_CACHED_STATEMENT_LENGTH`` bytes with at most
``MAX_CACHED_STATEMENT_PARAMS`` parameters: a longer one is parsed again on every
execution (a tenth of a worker's CPU when the completion was 5.5 KB). An expanding
parameter (``IN`` over a list) makes SQLAlchemy render the text again per execution
and gives each list length its own text. These checks fail the moment a statement grows
past either cache.
"""

from __future__ import annotations

import pytest
from psycopg import _queries
from sqlalchemy.dialects import postgresql

from core.step_statements import hot_path

FUSED = ("start_pg", "claim_pg", "complete_pg", "finish_pg", "outputs", "execution", "current")


@pytest.mark.parametrize("name", FUSED)
def test_a_hot_statement_stays_within_psycopgs_query_cache(name: str) -> None:
    compiled = getattr(hot_path("postgresql"), name).compile(dialect=postgresql.psycopg.dialect())
    text = str(compiled)

    assert "POSTCOMPILE" not in text, "an expanding parameter is rendered per execution"
    assert len(text.encode()) <= _queries.MAX_CACHED_STATEMENT_LENGTH
    assert len(compiled.params) <= _queries.MAX_CACHED_STATEMENT_PARAMS
