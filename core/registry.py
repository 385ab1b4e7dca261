"""Finds workflows by name: from the modules named in ``CONVEYOR_WORKFLOW_MODULES``.

Users add workflows without editing conveyor: any module-level ``Workflow`` in a
listed module is registered, after its whole DAG is validated.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache

from pydantic import BaseModel

from core.config import get_settings
from core.errors import DefinitionError, WorkflowNotFound
from core.workflows import Workflow


class WorkflowRegistry:
    """Workflows by (name, version); lookups without a version get the newest."""

    def __init__(self, workflows: Iterable[Workflow] = ()) -> None:
        self._workflows: dict[tuple[str, int], Workflow] = {}
        self._event_schemas: dict[str, type[BaseModel] | None] = {}
        for workflow in workflows:
            self.register(workflow)

    def register(self, workflow: Workflow) -> Workflow:
        """Validate and add ``workflow``; the same name and version twice is an error."""
        workflow.validate(get_settings().max_child_depth)
        key = (workflow.name, workflow.version)
        existing = self._workflows.get(key)
        if existing is not None and existing is not workflow:
            raise DefinitionError(
                f"workflow {workflow.name!r} version {workflow.version} is registered twice"
            )
        # The events its waits take must mean one payload everywhere: send_event checks
        # the payload against that schema before storing anything.
        for event, schema in workflow.event_schemas().items():
            known = self._event_schemas.setdefault(event, schema)
            if known is not schema:
                raise DefinitionError(
                    f"workflow {workflow.name!r} waits for event {event!r} with another "
                    "schema than a registered workflow does: one event, one schema"
                )
        self._workflows[key] = workflow
        # A child runs on the workers that run its parent: it is registered with it.
        for child in workflow.child_workflows():
            if self._workflows.get((child.name, child.version)) is not child:
                self.register(child)
        return workflow

    def event_schema(self, event: str) -> type[BaseModel] | None:
        """The payload schema of ``event`` (None: any JSON, or no workflow waits for it)."""
        return self._event_schemas.get(event)

    def load_module(self, module_name: str) -> list[Workflow]:
        """Import ``module_name`` and register every module-level Workflow in it."""
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise DefinitionError(f"cannot import workflow module {module_name!r}: {exc}") from exc
        found = [value for value in vars(module).values() if isinstance(value, Workflow)]
        return [self.register(workflow) for workflow in found]

    def get(self, name: str, version: int | None = None) -> Workflow:
        """The workflow called ``name`` (newest version unless one is given)."""
        if version is not None:
            found = self._workflows.get((name, version))
        else:
            versions = [w for (n, _), w in self._workflows.items() if n == name]
            found = max(versions, key=lambda w: w.version) if versions else None
        if found is None:
            raise WorkflowNotFound(name, version, sorted({n for n, _ in self._workflows}))
        return found

    def queue_of(self, name: str, version: int, step: str, default: str | None = None) -> str:
        """The broker queue of step ``step`` of workflow ``name`` at ``version``
        (``Workflow.queue_of``); ``default`` (else ``CONVEYOR_DEFAULT_QUEUE``) where this
        process does not know it, as its messages are sent then."""
        found = self._workflows.get((name, version))
        if found is None or step not in found.steps:
            return default if default is not None else get_settings().default_queue
        return found.queue_of(step, default)

    def __iter__(self) -> Iterator[Workflow]:
        return iter(sorted(self._workflows.values(), key=lambda w: (w.name, w.version)))

    def __len__(self) -> int:
        return len(self._workflows)


_configured: WorkflowRegistry | None = None


def configure_registry(registry: WorkflowRegistry | None) -> None:
    """Make ``registry`` the process's (None: load ``CONVEYOR_WORKFLOW_MODULES`` afresh)."""
    global _configured
    _configured = registry
    _registry_from_settings.cache_clear()


@contextmanager
def using_registry(registry: WorkflowRegistry) -> Iterator[WorkflowRegistry]:
    """Make ``registry`` the process's for the block, then put the previous one back."""
    global _configured
    previous, _configured = _configured, registry
    try:
        yield registry
    finally:
        _configured = previous


def get_registry() -> WorkflowRegistry:
    """The process's registry: the configured one, else loaded once from
    ``CONVEYOR_WORKFLOW_MODULES``."""
    return _configured if _configured is not None else _registry_from_settings()


@lru_cache(maxsize=1)
def _registry_from_settings() -> WorkflowRegistry:
    registry = WorkflowRegistry()
    for module_name in get_settings().workflow_modules:
        registry.load_module(module_name)
    return registry
