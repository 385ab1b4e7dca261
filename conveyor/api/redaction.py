"""Tokens never reach a log: uvicorn's access log prints URLs as clients sent them.

The API reads tokens only from the Authorization header, but a client may still put one
in a query string (and get a 401); the access log would keep it. This filter rewrites
anything shaped like a conveyor token in the record before any handler sees it.
"""

from __future__ import annotations

import logging
import re

from core.accounts import TOKEN_PREFIX

TOKEN = re.compile(re.escape(TOKEN_PREFIX) + r"[A-Za-z0-9_\-]+")
REDACTED = TOKEN_PREFIX + "***"
LOGGERS = ("uvicorn.access", "uvicorn.error")


class TokenRedaction(logging.Filter):
    """Replaces conveyor tokens in a record's message and arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = TOKEN.sub(REDACTED, record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(
                TOKEN.sub(REDACTED, arg) if isinstance(arg, str) else arg for arg in record.args
            )
        return True


_FILTER = TokenRedaction()


def install() -> None:
    """Put the filter on uvicorn's loggers (once per process: the same instance)."""
    for name in LOGGERS:
        logging.getLogger(name).addFilter(_FILTER)
