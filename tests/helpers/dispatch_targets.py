"""Dispatchers that tests name in CONVEYOR_DISPATCHER: they record what they were asked
to start. ``slow_dispatcher`` is one whose import takes until a test lets it finish."""

from __future__ import annotations

import threading
from collections.abc import Sequence

DISPATCHED: list[tuple[str, str, int]] = []
IMPORTING = threading.Event()  # slow_dispatcher's import has begun
RELEASE = threading.Event()  # slow_dispatcher's import may finish
_lock = threading.Lock()


def reset() -> None:
    """Forget what was dispatched; the next import of slow_dispatcher waits again."""
    DISPATCHED.clear()
    IMPORTING.clear()
    RELEASE.clear()


def record(starts: Sequence[tuple[str, str, int]]) -> None:
    """A dispatcher: keeps each start."""
    with _lock:
        DISPATCHED.extend(starts)
