"""What the dashboard shows of wait nodes: each one's declaration (for the step panel),
the approval form an event wait's payload schema becomes, and how many executions are
parked on their waits (the list's ``waiting`` count).

The form is described here, from the schema, and drawn by the page's script: each
field says which input it is and what the schema asks of it. The API stays the judge
of a payload (its 422 names ``payload.<field>``); the form only guides the person.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import Connection, Table, func, select

from core.executions import ExecutionFilter
from core.models import WorkflowExecution
from core.states import ExecutionStatus
from core.workflows import ChildWait, EventWait, Sleep, Step, Workflow

WE = cast(Table, WorkflowExecution.__table__)
# JSON Schema's numeric and text limits, mirrored as the inputs' attributes (a hint to
# the person; the API checks them).
LIMITS = {
    "minimum": "min",
    "maximum": "max",
    "minLength": "minlength",
    "maxLength": "maxlength",
}


def _resolved(spec: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    # pydantic puts an Enum's schema in $defs and refers to it; a field's own keys
    # (its default, description) sit beside the reference and win over the target's.
    ref = spec.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        target = defs.get(ref.removeprefix("#/$defs/"), {})
        return {**target, **{k: v for k, v in spec.items() if k != "$ref"}}
    return spec


def _nullable(spec: dict[str, Any], defs: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    # Optional[X] is anyOf [X, null]: the form shows X, and leaving it empty sends nothing.
    options = spec.get("anyOf")
    if not isinstance(options, list):
        return _resolved(spec, defs), False
    kept = [o for o in options if isinstance(o, dict) and o.get("type") != "null"]
    if len(kept) != 1:
        return spec, len(kept) < len(options)
    merged = {**_resolved(kept[0], defs), **{k: v for k, v in spec.items() if k != "anyOf"}}
    return merged, len(kept) < len(options)


def field_of(
    name: str, spec: dict[str, Any], required: bool, defs: dict[str, Any]
) -> dict[str, Any]:
    """One form field for property ``name`` of a payload schema: its ``widget``
    (checkbox, choice, text, number, select or json), label, whether it is required,
    its default, and the limits and options the schema gives."""
    shown, nullable = _nullable(spec, defs)
    kind = shown.get("type")
    field: dict[str, Any] = {
        "name": name,
        "label": str(shown.get("title") or name),
        "required": required,
        "description": shown.get("description"),
    }
    if "default" in shown:
        field["default"] = shown["default"]
    values = shown.get("enum")
    if "const" in shown:
        values = [shown["const"]]
    if isinstance(values, list) and values:
        field.update(widget="select", options=values)
    elif kind == "boolean":
        # A required yes/no without a default is a choice the person must make: two
        # radios, neither chosen, rather than a checkbox that sends "no" untouched.
        field["widget"] = "choice" if required and "default" not in shown else "checkbox"
    elif kind in ("integer", "number"):
        field.update(widget="number", integer=kind == "integer")
    elif kind == "string":
        field["widget"] = "text"
    else:
        # Objects, arrays, unions: typed as JSON.
        field["widget"] = "json"
    for key, attribute in LIMITS.items():
        if key in shown:
            field[attribute] = shown[key]
    field["nullable"] = nullable
    return field


def form_fields(schema: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The approval form of a payload JSON Schema: a field per property, in the
    schema's order; a schema with no properties (or none at all) is one JSON field
    named ``""``, which is the payload itself."""
    if schema is None or not isinstance(schema.get("properties"), dict):
        return [{"name": "", "label": "Payload (JSON)", "widget": "json", "required": False}]
    defs = schema.get("$defs", {})
    required = set(schema.get("required", []))
    properties: dict[str, Any] = schema["properties"]
    return [
        field_of(name, spec if isinstance(spec, dict) else {}, name in required, defs)
        for name, spec in properties.items()
    ]


def wait_view(step: Step) -> dict[str, Any] | None:
    """What the page shows of a wait node's declaration (None for a task)."""
    wait = step.wait
    if wait is None:
        return None
    view: dict[str, Any] = {"kind": wait.kind}
    if isinstance(wait, Sleep):
        view["duration_seconds"] = wait.duration.total_seconds() if wait.duration else None
        view["until"] = wait.until is not None
    elif isinstance(wait, EventWait):
        schema = wait.schema.model_json_schema() if wait.schema is not None else None
        view.update(
            event=wait.event,
            timeout_seconds=wait.timeout.total_seconds() if wait.timeout else None,
            on_timeout="fail" if wait.fails_on_timeout else "succeed",
            schema=schema,
            fields=form_fields(schema),
        )
    elif isinstance(wait, ChildWait):
        view["workflow"] = wait.workflow.name
    return view


def wait_views(workflow: Workflow | None) -> dict[str, dict[str, Any]]:
    """Each wait node of ``workflow`` by step name (none when it is not registered)."""
    if workflow is None:
        return {}
    views = {name: wait_view(step) for name, step in workflow.steps.items()}
    return {name: view for name, view in views.items() if view is not None}


def count_waiting(conn: Connection, where: ExecutionFilter) -> int:
    """How many of the executions ``where`` selects (its statuses ignored) are parked:
    running, every open step waiting (the listing's ``waiting``)."""
    query = (
        select(func.count())
        .select_from(WE)
        .where(WE.c.status == ExecutionStatus.RUNNING.value, WE.c.parked_at.is_not(None))
    )
    if where.workflow_id is not None:
        query = query.where(WE.c.workflow_id == where.workflow_id)
    if where.triggered_by is not None:
        query = query.where(WE.c.triggered_by == where.triggered_by)
    if where.created_after is not None:
        query = query.where(WE.c.created_at >= where.created_after)
    if where.created_before is not None:
        query = query.where(WE.c.created_at < where.created_before)
    return int(conn.execute(query).scalar_one())
