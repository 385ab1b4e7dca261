"""Which broker queues live workers consume: Celery's own answer (``inspect`` broadcast
``active_queues``), for ``conveyor status`` to tell a step queued on a queue no worker
takes (``queue=``) from one that waits its turn. A broadcast waits its whole timeout for
answers, so it is asked by operators' commands only, never on a step's path.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)

# Seconds to collect the workers' answers: a worker busy with steps still answers at
# once (its consumer thread does), so this is the wait for the last reply.
INSPECT_TIMEOUT = 1.0


def live_queues(app: Celery, timeout: float = INSPECT_TIMEOUT) -> frozenset[str] | None:
    """The queues the workers that answer within ``timeout`` consume (empty: none
    answered); None when the broker cannot tell (a transport without broadcast, such
    as the embedded one, or a broker error)."""
    try:
        answers = app.control.inspect(timeout=timeout).active_queues()
    except Exception:  # an answer for operators only: "unknown" is a fine one
        log.debug("asking the workers for their queues failed", exc_info=True)
        return None
    return frozenset(queue["name"] for queues in (answers or {}).values() for queue in queues or ())
