"""ExecutionStateManager: create, read and move workflow executions.

Async, as in the migration guide (``await ExecutionStateManager().create_execution(...)``);
Celery workers use ``SyncExecutionStateManager``, which runs the same plans
(``core.operations``) through a sync runner. Every write is one retried transaction
(``core.transactions``); every transition is a compare-and-set with its event row.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, TypeVar, Unpack

from core.database import Database, get_database
from core.dispatch import Start, dispatch_starts
from core.models import WorkflowExecution
from core.operations import NewExecution
from core.outcomes import CreatedExecution, TransitionResult
from core.registry import WorkflowRegistry, get_registry
from core.state_requests import ExecutionOptions, StateRequests
from core.transactions import AsyncTransactionRunner, PlanFactory, RetryPolicy, TransactionRunner

T = TypeVar("T")
Statuses = str | Iterable[str] | None


class StateManagerBase:
    """What both managers share: where the database is and how transactions retry."""

    def __init__(
        self,
        database: Database | None = None,
        *,
        retry_policy: RetryPolicy | None = None,
        registry: WorkflowRegistry | None = None,
    ) -> None:
        self._database = database
        self._retry_policy = retry_policy
        self._registry = registry

    @property
    def registry(self) -> WorkflowRegistry:
        """The registry given, else the process's (``core.registry.get_registry()``)."""
        return self._registry if self._registry is not None else get_registry()

    @property
    def database(self) -> Database:
        """The Database given, else the process's (``core.database.get_database()``)."""
        return self._database if self._database is not None else get_database()

    @property
    def requests(self) -> StateRequests:
        """Argument checking and plan building for this manager's database."""
        settings = self.database.settings
        return StateRequests(settings, settings.sync_database_url.get_backend_name())

    @property
    def retry_policy(self) -> RetryPolicy:
        """The policy given, else the one from settings."""
        if self._retry_policy is not None:
            return self._retry_policy
        return RetryPolicy.from_settings(self.database.settings)


def _start_of(created: CreatedExecution, new: NewExecution) -> Start:
    return (created.execution_id, new.workflow_id, new.priority)


def _slot_freed_by(execution: WorkflowExecution) -> Start:
    # A start of the finished execution is a no-op for it, and admits the next waiting
    # execution of its workflow when a concurrency limit held that one back.
    return (execution.execution_id, execution.workflow_id, execution.priority)


class ExecutionStateManager(StateManagerBase):
    """Async access to executions: every call is one retried transaction."""

    async def run(self, plan: PlanFactory[T]) -> T:
        """Run a plan in a retried async transaction."""
        database = self.database
        return await AsyncTransactionRunner(database.async_sessions, self.retry_policy).run(plan)

    async def create_execution(
        self, workflow_id: str, input_data: Any, **options: Unpack[ExecutionOptions]
    ) -> str:
        """Create an execution of a registered workflow and start it; return its id.

        As ``worker.producer.enqueue`` does: the input is checked against the workflow's
        model (InputValidationError, nothing written), an unknown workflow raises
        WorkflowNotFound, the execution and one row per step are committed, then its
        start is dispatched to the workers (``core.dispatch``). An ``idempotency_key``
        already in use returns that execution's id instead; the same key with another
        workflow or input raises IdempotencyConflict.
        """
        created = await self.create_or_get_execution(workflow_id, input_data, **options)
        return created.execution_id

    async def create_or_get_execution(
        self, workflow_id: str, input_data: Any, **options: Unpack[ExecutionOptions]
    ) -> CreatedExecution:
        """Like ``create_execution``, also telling whether this call created the row."""
        new, plan = self.requests.create_execution(self.registry, workflow_id, input_data, options)
        created = await self.run(plan)
        if created.created:
            # Publishing is blocking I/O (kombu): keep it off the event loop.
            await asyncio.to_thread(dispatch_starts, [_start_of(created, new)])
        return created

    async def get_execution(self, execution_id: str) -> WorkflowExecution:
        """The execution (detached, attributes loaded), or ExecutionNotFound."""
        return await self.run(self.requests.get_execution(execution_id))

    async def list_executions(
        self, *, status: str | None = None, workflow_id: str | None = None, limit: int = 50
    ) -> list[WorkflowExecution]:
        """Executions, newest first, optionally of one status and one workflow."""
        return await self.run(self.requests.list_executions(status, workflow_id, limit))

    async def transition_execution(
        self,
        execution_id: str,
        to: str,
        *,
        expected: Statuses = None,
        reason: str | None = None,
        retry: bool = False,
    ) -> TransitionResult:
        """Compare-and-set the execution's status to ``to``, with its event row.

        ``expected`` narrows the statuses it may move from; an edge the state machine
        does not have raises InvalidTransition before anything is sent. A row in some
        other status is *not applied* (``result.applied`` is False), never an error.
        ``retry=True`` allows the explicit retry edges out of final statuses.
        """
        request = self.requests.transition_execution(execution_id, to, expected, reason, retry)
        return await self.run(request)

    async def cancel_execution(
        self, execution_id: str, *, reason: str | None = "cancelled"
    ) -> TransitionResult:
        """Cancel an open execution and all its open steps, in one transaction; its
        workflow's next waiting execution may then start (its concurrency slot is free)."""
        result = await self.run(self.requests.cancel_execution(execution_id, reason))
        if result.applied:
            execution = await self.get_execution(execution_id)
            await asyncio.to_thread(dispatch_starts, [_slot_freed_by(execution)])
        return result


class SyncExecutionStateManager(StateManagerBase):
    """The sync twin of ExecutionStateManager (Celery workers, CLI): same plans."""

    def run(self, plan: PlanFactory[T]) -> T:
        """Run a plan in a retried sync transaction."""
        return TransactionRunner(self.database.sessions, self.retry_policy).run(plan)

    def create_execution(
        self, workflow_id: str, input_data: Any, **options: Unpack[ExecutionOptions]
    ) -> str:
        """See ExecutionStateManager.create_execution."""
        return self.create_or_get_execution(workflow_id, input_data, **options).execution_id

    def create_or_get_execution(
        self, workflow_id: str, input_data: Any, **options: Unpack[ExecutionOptions]
    ) -> CreatedExecution:
        """See ExecutionStateManager.create_or_get_execution."""
        new, plan = self.requests.create_execution(self.registry, workflow_id, input_data, options)
        created = self.run(plan)
        if created.created:
            dispatch_starts([_start_of(created, new)])
        return created

    def get_execution(self, execution_id: str) -> WorkflowExecution:
        """See ExecutionStateManager.get_execution."""
        return self.run(self.requests.get_execution(execution_id))

    def list_executions(
        self, *, status: str | None = None, workflow_id: str | None = None, limit: int = 50
    ) -> list[WorkflowExecution]:
        """See ExecutionStateManager.list_executions."""
        return self.run(self.requests.list_executions(status, workflow_id, limit))

    def transition_execution(
        self,
        execution_id: str,
        to: str,
        *,
        expected: Statuses = None,
        reason: str | None = None,
        retry: bool = False,
    ) -> TransitionResult:
        """See ExecutionStateManager.transition_execution."""
        return self.run(
            self.requests.transition_execution(execution_id, to, expected, reason, retry)
        )

    def cancel_execution(
        self, execution_id: str, *, reason: str | None = "cancelled"
    ) -> TransitionResult:
        """See ExecutionStateManager.cancel_execution."""
        result = self.run(self.requests.cancel_execution(execution_id, reason))
        if result.applied:
            dispatch_starts([_slot_freed_by(self.get_execution(execution_id))])
        return result
