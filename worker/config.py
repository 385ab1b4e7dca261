"""Celery configuration derived from conveyor's settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.config import Settings
from core.registry import WorkflowRegistry
from worker import filesystem_transport

MAX_PRIORITY = 9
# Longest any step may run before the broker may hand its message to another worker;
# kept above every hard timeout so that a running step is not redelivered under it.
VISIBILITY_MARGIN = 60
# The name of the task that fires schedules (worker.schedules), and the least time
# its message may wait in the queue before it is dropped as stale.
FIRE_SCHEDULES = "conveyor.fire_schedules"
SCHEDULE_EXPIRES_MIN = 60.0
RECONCILE = "conveyor.reconcile"
WAKE = "conveyor.wake"
PRUNE = "conveyor.prune"
# Beat sends these every few seconds: their per-message lines are DEBUG (worker.logs).
HOUSEKEEPING_TASKS = (RECONCILE, FIRE_SCHEDULES, WAKE, PRUNE)


def broker_kind(settings: Settings) -> str:
    """The broker transport named by the URL: redis, filesystem, amqp, memory."""
    url = settings.broker_url.get_secret_value()
    return url.split("://", 1)[0].split("+", 1)[0]


def visibility_timeout(settings: Settings, registry: WorkflowRegistry) -> int:
    """The configured visibility timeout, raised above the longest hard step timeout."""
    longest = max(
        (step.timeout or 0 for workflow in registry for step in workflow.steps.values()),
        default=0,
    )
    return max(settings.visibility_timeout, int(longest) + VISIBILITY_MARGIN)


def transport_options(settings: Settings, registry: WorkflowRegistry) -> dict[str, Any]:
    """Broker transport options: folders for the embedded broker, priorities for Redis."""
    kind = broker_kind(settings)
    if kind == "filesystem":
        root = Path(settings.broker_folder).resolve()
        for sub in ("queue", "processed", "control", filesystem_transport.QUARANTINE):
            (root / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(root / "queue"),
            "data_folder_out": str(root / "queue"),
            "processed_folder": str(root / "processed"),
            # Message files that cannot be decoded, set aside (worker.filesystem_transport).
            "quarantine_folder": str(root / filesystem_transport.QUARANTINE),
            # Fanout tables (revokes, pings): kombu's default is ./control in the cwd.
            "control_folder": str(root / "control"),
            "store_processed": False,
            # kombu polls the folder once a second by default: far too slow for steps.
            "polling_interval": settings.broker_poll_interval,
        }
    if kind in ("redis", "rediss"):
        return {
            "visibility_timeout": visibility_timeout(settings, registry),
            "queue_order_strategy": "priority",
            "priority_steps": list(range(MAX_PRIORITY + 1)),
            "sep": ":",
        }
    return {}


def celery_config(settings: Settings, registry: WorkflowRegistry) -> dict[str, Any]:
    """Everything Celery reads from ``app.conf``."""
    return {
        "broker_url": settings.broker_url.get_secret_value(),
        # filesystem:// URLs get conveyor's transport, whose messages appear whole
        # (kombu's own can hand a consumer a half-written file; see the module).
        "broker_transport": (
            filesystem_transport.TRANSPORT if broker_kind(settings) == "filesystem" else None
        ),
        "broker_transport_options": transport_options(settings, registry),
        "broker_connection_retry_on_startup": True,
        # JSON only: pickle would let whoever can write to the broker run code.
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # State lives in SQL; Celery's own result backend would only duplicate it.
        "task_ignore_result": True,
        # Ack after the step is recorded; a worker killed mid-step lets the message go
        # back to the queue. One message at a time per process keeps stalls local.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Events for Flower.
        "worker_send_task_events": True,
        # A "sent" event is one more Redis publish per message (half of enqueue_many's
        # publishing time); Flower shows tasks from "received" on without it.
        "task_send_sent_event": settings.task_sent_events,
        "task_default_queue": settings.default_queue,
        "task_queue_max_priority": MAX_PRIORITY,
        "task_default_priority": 0,
        "timezone": "UTC",
        "enable_utc": True,
        "beat_schedule": {
            "conveyor-reconcile": {
                "task": RECONCILE,
                "schedule": settings.reconcile_interval,
                # Ahead of queued steps: recovery must not wait behind the backlog.
                "options": {
                    "expires": settings.reconcile_interval * 2,
                    "priority": broker_priority(settings, MAX_PRIORITY),
                },
            },
            "conveyor-wake": {
                "task": WAKE,
                "schedule": settings.wake_interval,
                # Ahead of queued steps: a due sleep or timeout wakes on time.
                "options": {
                    "expires": settings.wake_interval * 2,
                    "priority": broker_priority(settings, MAX_PRIORITY),
                },
            },
            # Retention (core.retention): finished executions past it deleted, payloads
            # cleared, in short batches; a pass that overlaps another takes other rows.
            "conveyor-prune": {
                "task": PRUNE,
                "schedule": settings.prune_interval,
                "options": {"expires": settings.prune_interval},
            },
            "conveyor-schedules": {
                "task": FIRE_SCHEDULES,
                "schedule": settings.schedule_interval,
                # Ahead of steps waiting in the queue, so ticks fire on time; a pass
                # dropped as expired is covered by the next one.
                "options": {
                    "expires": max(settings.schedule_interval * 2, SCHEDULE_EXPIRES_MIN),
                    "priority": broker_priority(settings, MAX_PRIORITY),
                },
            },
        },
    }


def broker_priority(settings: Settings, priority: int, kind: str = "step") -> int:
    """A conveyor priority (0-9, higher runs sooner) of a ``step`` or ``start`` message as
    the broker's message priority (Redis pops its 0 first; AMQP delivers its 9 first).

    Depth-first (``CONVEYOR_ORDER=depth_first``, the default): within a class of two
    neighbouring priorities (8-9, 6-7, ... 0-1), steps of running executions go ahead of
    the starts of new ones, so the executions of a burst finish in the order they came;
    a higher class still goes first. Brokers offer ten levels, so depth-first orders
    five priority classes; breadth-first orders all ten priorities, steps and starts
    alike, in arrival order.
    """
    bounded = max(0, min(MAX_PRIORITY, priority))
    if settings.order == "depth_first":
        bounded = 2 * (bounded // 2) + (1 if kind == "step" else 0)
    return MAX_PRIORITY - bounded if broker_kind(settings) in ("redis", "rediss") else bounded
