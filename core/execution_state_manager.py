"""ExecutionStateManager: create, read and move workflow executions.

Async, as in the migration guide (``await ExecutionStateManager().create_execution(...)``);
``SyncExecutionStateManager`` is the same for sync code (CLI, scripts). Both run the
same units of work (``core.executions``) through ``core.transactions.Transactions``:
every call is one retried transaction, every transition a compare-and-set with its
event row. Arguments are checked here, once, before anything is sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any, ParamSpec, TypedDict, TypeVar, Unpack

from core import executions, transitions
from core.database import Database, get_database
from core.dispatch import Start, dispatch_starts
from core.errors import InvalidTransition
from core.executions import NewExecution
from core.models import WorkflowExecution
from core.outcomes import CreatedExecution, TransitionResult
from core.registry import WorkflowRegistry, get_registry
from core.states import EXECUTIONS, STEPS, ExecutionStatus
from core.transactions import RetryPolicy, Transactions, Work

T = TypeVar("T")
P = ParamSpec("P")
Statuses = str | Iterable[str] | None
RetryArguments = tuple[dict[str, tuple[str, ...]], timedelta | None]


class ExecutionOptions(TypedDict, total=False):
    """Optional arguments of ``create_execution``."""

    workflow_version: int
    idempotency_key: str | None
    triggered_by: str | None
    priority: int
    deadline_at: datetime | None


def statuses(parse: Any, expected: object | Iterable[object] | None) -> frozenset[Any] | None:
    """``expected`` (one status or several) parsed, or None."""
    if expected is None:
        return None
    if isinstance(expected, str):
        return frozenset({parse(expected)})
    if isinstance(expected, Iterable):
        return frozenset(parse(value) for value in expected)
    return frozenset({parse(expected)})


class StateManagerBase:
    """What both managers share: the database, the workflows, how transactions retry,
    and the checks of each call's arguments."""

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
        self._transactions: Transactions | None = None

    @property
    def database(self) -> Database:
        """The Database given, else the process's (``core.database.get_database()``)."""
        return self._database if self._database is not None else get_database()

    @property
    def registry(self) -> WorkflowRegistry:
        """The registry given, else the process's (``core.registry.get_registry()``)."""
        return self._registry if self._registry is not None else get_registry()

    @property
    def retry_policy(self) -> RetryPolicy:
        """The policy given, else the one from settings."""
        if self._retry_policy is not None:
            return self._retry_policy
        return RetryPolicy.from_settings(self.database.settings)

    @property
    def transactions(self) -> Transactions:
        """The runner of this manager's units of work (kept while the database is)."""
        database = self.database
        if self._transactions is None or self._transactions.database is not database:
            self._transactions = Transactions(database, self.retry_policy)
        return self._transactions

    def _new_execution(
        self, workflow_id: str, input_data: Any, options: ExecutionOptions
    ) -> NewExecution:
        return executions.execution_of(
            self.registry,
            workflow_id,
            input_data,
            max_payload_bytes=self.database.settings.max_payload_bytes,
            **options,
        )

    @staticmethod
    def _list_arguments(status: str | None, limit: int) -> tuple[ExecutionStatus | None, int]:
        return (EXECUTIONS.parse(status) if status is not None else None), max(1, min(limit, 1000))

    @staticmethod
    def _execution_move(
        to: str, expected: Statuses, retry: bool
    ) -> tuple[ExecutionStatus, frozenset[ExecutionStatus]]:
        target = EXECUTIONS.parse(to)
        if retry and target is not ExecutionStatus.PENDING:
            raise InvalidTransition(
                "execution",
                " | ".join(sorted(EXECUTIONS.sources_of(ExecutionStatus.PENDING, retry=True))),
                target,
                "a retry goes back to pending, to be admitted like a start",
            )
        return target, transitions.execution_sources(
            target, statuses(EXECUTIONS.parse, expected), retry
        )

    def _retry_of(self, execution: WorkflowExecution) -> RetryArguments:
        """What retrying ``execution`` needs of its workflow: the graph and the deadline
        (WorkflowNotFound when this process does not know the workflow)."""
        workflow = self.registry.get(execution.workflow_id, execution.workflow_version)
        return workflow.upstream_map(), workflow.deadline

    @staticmethod
    def _step_move(to: str, expected: Statuses, retry: bool) -> tuple[Any, frozenset[Any]]:
        target = STEPS.parse(to)
        return target, transitions.step_sources(target, statuses(STEPS.parse, expected), retry)


def _start_of(created: CreatedExecution, new: NewExecution) -> Start:
    return (created.execution_id, new.workflow_id, new.priority)


def _slot_freed_by(execution: WorkflowExecution) -> Start:
    # A start of the finished execution is a no-op for it, and admits the next waiting
    # execution of its workflow when a concurrency limit held that one back. For a
    # retried (pending again) execution it is its own start.
    return (execution.execution_id, execution.workflow_id, execution.priority)


class ExecutionStateManager(StateManagerBase):
    """Async access to executions: every call is one retried transaction."""

    async def run(self, work: Work[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a unit of work (``work(connection, ...)``) in a retried async transaction."""
        return await self.transactions.run_async(work, *args, **kwargs)

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
        new = self._new_execution(workflow_id, input_data, options)
        created = await self.run(executions.create_execution, new)
        if created.created and not created.held:
            # Publishing is blocking I/O (kombu): keep it off the event loop.
            await asyncio.to_thread(dispatch_starts, [_start_of(created, new)])
        return created

    async def get_execution(self, execution_id: str) -> WorkflowExecution:
        """The execution (detached, attributes loaded), or ExecutionNotFound."""
        return await self.run(executions.get_execution, execution_id)

    async def list_executions(
        self, *, status: str | None = None, workflow_id: str | None = None, limit: int = 50
    ) -> list[WorkflowExecution]:
        """Executions, newest first, optionally of one status and one workflow."""
        parsed, bounded = self._list_arguments(status, limit)
        return await self.run(executions.list_executions, parsed, workflow_id, bounded)

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

        The steps follow (``core.executions.move_execution``): a final status cancels
        the open steps in the same transaction, and ``succeeded`` is refused with
        InvalidTransition while a step is open. A final status frees a concurrency
        slot: the workflow's next waiting execution may start. ``retry=True`` allows
        the explicit retry edges out of final statuses, to ``pending``: that is
        ``retry_execution``.
        """
        target, sources = self._execution_move(to, expected, retry)
        if retry:
            return await self.retry_execution(execution_id, reason=reason, expected=sources)
        result = await self.run(executions.move_execution, execution_id, target, sources, reason)
        if result.applied and target in EXECUTIONS.final:
            execution = await self.get_execution(execution_id)
            await asyncio.to_thread(dispatch_starts, [_slot_freed_by(execution)])
        return result

    async def retry_execution(
        self,
        execution_id: str,
        *,
        reason: str | None = "retry",
        expected: frozenset[ExecutionStatus] | None = None,
    ) -> TransitionResult:
        """Run a failed, cancelled or timed-out execution again from its unfinished steps
        (``core.executions.retry_execution``): back to pending with a new deadline and
        its steps' attempts whole again, then its start is dispatched, to be admitted
        like a new execution (priority, max_concurrency). Not applied when it is in
        no status a retry leaves (or not in ``expected``)."""
        execution = await self.get_execution(execution_id)
        graph, deadline = self._retry_of(execution)
        result = await self.run(
            executions.retry_execution, execution_id, graph, deadline, reason, expected
        )
        if result.applied:
            await asyncio.to_thread(dispatch_starts, [_slot_freed_by(execution)])
        return result

    async def cancel_execution(
        self, execution_id: str, *, reason: str | None = "cancelled"
    ) -> TransitionResult:
        """Cancel an open execution and all its open steps, in one transaction; its
        workflow's next waiting execution may then start (its concurrency slot is free)."""
        result = await self.run(executions.cancel_execution, execution_id, reason)
        if result.applied:
            execution = await self.get_execution(execution_id)
            await asyncio.to_thread(dispatch_starts, [_slot_freed_by(execution)])
        return result


class SyncExecutionStateManager(StateManagerBase):
    """ExecutionStateManager for sync code (CLI, scripts): the same units of work."""

    def run(self, work: Work[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a unit of work (``work(connection, ...)``) in a retried transaction."""
        return self.transactions.run(work, *args, **kwargs)

    def create_execution(
        self, workflow_id: str, input_data: Any, **options: Unpack[ExecutionOptions]
    ) -> str:
        """See ExecutionStateManager.create_execution."""
        return self.create_or_get_execution(workflow_id, input_data, **options).execution_id

    def create_or_get_execution(
        self, workflow_id: str, input_data: Any, **options: Unpack[ExecutionOptions]
    ) -> CreatedExecution:
        """See ExecutionStateManager.create_or_get_execution."""
        new = self._new_execution(workflow_id, input_data, options)
        created = self.run(executions.create_execution, new)
        if created.created and not created.held:
            dispatch_starts([_start_of(created, new)])
        return created

    def get_execution(self, execution_id: str) -> WorkflowExecution:
        """See ExecutionStateManager.get_execution."""
        return self.run(executions.get_execution, execution_id)

    def list_executions(
        self, *, status: str | None = None, workflow_id: str | None = None, limit: int = 50
    ) -> list[WorkflowExecution]:
        """See ExecutionStateManager.list_executions."""
        parsed, bounded = self._list_arguments(status, limit)
        return self.run(executions.list_executions, parsed, workflow_id, bounded)

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
        target, sources = self._execution_move(to, expected, retry)
        if retry:
            return self.retry_execution(execution_id, reason=reason, expected=sources)
        result = self.run(executions.move_execution, execution_id, target, sources, reason)
        if result.applied and target in EXECUTIONS.final:
            dispatch_starts([_slot_freed_by(self.get_execution(execution_id))])
        return result

    def retry_execution(
        self,
        execution_id: str,
        *,
        reason: str | None = "retry",
        expected: frozenset[ExecutionStatus] | None = None,
    ) -> TransitionResult:
        """See ExecutionStateManager.retry_execution."""
        execution = self.get_execution(execution_id)
        graph, deadline = self._retry_of(execution)
        result = self.run(
            executions.retry_execution, execution_id, graph, deadline, reason, expected
        )
        if result.applied:
            dispatch_starts([_slot_freed_by(execution)])
        return result

    def cancel_execution(
        self, execution_id: str, *, reason: str | None = "cancelled"
    ) -> TransitionResult:
        """See ExecutionStateManager.cancel_execution."""
        result = self.run(executions.cancel_execution, execution_id, reason)
        if result.applied:
            dispatch_starts([_slot_freed_by(self.get_execution(execution_id))])
        return result
