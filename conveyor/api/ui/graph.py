"""A workflow's DAG drawn by Graphviz (``dot -Tsvg``) for the dashboard.

The layout depends only on the workflow's steps, their dependencies and each step's kind
(a task is a rounded box; a wait node has its own shape: ``KIND_SHAPES``), so it is
computed once per (workflow, version, shape, kinds) and cached; the pages colour the nodes by
step status in the browser (each node's ``<g>`` has ``id="step-<index>"``), so live
updates never lay the graph out again.

``dot`` takes about 0.2 s for a 50-wide fan-out and 2-4 s for 1,000 steps (20 layers of
50, or a 1,000-wide fan-out; measured on 2 shared cores). From ``LARGE_DAG`` steps on,
it is told to spend less on crossing minimisation (``mclimit``) and network simplex
(``nslimit``), which keeps big graphs within the timeout at little cost in clarity.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from core.workflows import Workflow

DOT_TIMEOUT = 30.0
LARGE_DAG = 300
LARGE_DAG_OPTIONS = ("-Gmclimit=0.2", "-Gnslimit=2", "-Gnslimit1=2")
CACHED_LAYOUTS = 64

Shape = tuple[tuple[str, tuple[str, ...]], ...]
# Each step's kind, in the shape's order ("task", "sleep", "event" or "child").
Kinds = tuple[str, ...]
# A wait node's outline tells what it waits for at a glance (the legend names them):
# a sleep is an oval, an event wait (approvals) a hexagon, a child workflow a 3-D box.
# A map is ONE node (a stack of boxes) however many items it has.
KIND_SHAPES = {"sleep": "ellipse", "event": "hexagon", "child": "box3d", "map": "folder"}


class LayoutError(Exception):
    """The DAG could not be drawn (``dot`` missing, failing or too slow); the message
    says which, for the page to show."""


@dataclass(frozen=True)
class Drawing:
    """A laid-out DAG: its SVG element and the element id of each step's node."""

    svg: str
    node_ids: Mapping[str, str]
    seconds: float


def shape_of(workflow: Workflow) -> Shape:
    """What the layout depends on: each step (in declaration order) and its upstream."""
    return tuple((step.name, tuple(step.depends_on)) for step in workflow.steps.values())


def kinds_of(workflow: Workflow) -> Kinds:
    """Each step's kind, in declaration order (what picks its node's shape)."""
    return tuple(step.kind for step in workflow.steps.values())


def node_ids(shape: Shape) -> dict[str, str]:
    """The SVG element id of each step's node."""
    return {name: f"step-{index}" for index, (name, _) in enumerate(shape)}


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dot_source(shape: Shape, kinds: Kinds = ()) -> str:
    """The DOT text of a DAG, left to right, one box per task and a shape per wait kind
    (``kinds`` in the shape's order; missing ones are tasks)."""
    ids = node_ids(shape)
    lines = [
        "digraph workflow {",
        "  rankdir=LR; nodesep=0.15; ranksep=0.45; bgcolor=transparent;",
        '  node [shape=box, style="rounded,filled", fillcolor="#e5e7eb", color="#6b7280",'
        ' fontname="sans-serif", fontsize=10, height=0.3, margin="0.12,0.04"];',
        '  edge [color="#9ca3af", arrowsize=0.6];',
    ]
    for index, (name, _) in enumerate(shape):
        kind = kinds[index] if index < len(kinds) else "task"
        outline = KIND_SHAPES.get(kind)
        # A task's node is class "step" alone (as before waits); a wait's names its kind.
        classes = "step" if outline is None else f"step kind-{kind}"
        drawn = "" if outline is None else f', shape={outline}, style="filled"'
        lines.append(f'  {_quoted(name)} [id="{ids[name]}", class="{classes}"{drawn}];')
    for name, upstream in shape:
        lines.extend(f"  {_quoted(parent)} -> {_quoted(name)};" for parent in upstream)
    lines.append("}")
    return "\n".join(lines) + "\n"


_SVG_START = re.compile(r"<svg\b[^>]*>", re.DOTALL)
_SIZE = re.compile(r'\s(?:width|height)="[^"]*"')


def run_dot(source: str, *, steps: int, timeout: float = DOT_TIMEOUT) -> str:
    """``dot -Tsvg`` of ``source``: the ``<svg>`` element alone, sized by its viewBox
    (the page scales it), or LayoutError."""
    dot = shutil.which("dot")
    if dot is None:
        raise LayoutError("Graphviz is not installed (no `dot` on PATH): apt-get install graphviz")
    options = LARGE_DAG_OPTIONS if steps >= LARGE_DAG else ()
    try:
        done = subprocess.run(
            [dot, "-Tsvg", *options],
            input=source.encode(),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise LayoutError(f"Graphviz took over {timeout:g} s to lay out {steps} steps") from None
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip()[:300]
        raise LayoutError(f"Graphviz failed ({done.returncode}): {message}")
    svg = done.stdout.decode()
    start = _SVG_START.search(svg)
    if start is None:
        raise LayoutError("Graphviz returned no SVG")
    tag = _SIZE.sub("", start.group(0))
    tag = tag.replace("<svg", '<svg class="dag-svg" role="img" aria-label="workflow DAG"', 1)
    return tag + svg[start.end() :].strip()


_locks: dict[tuple[str, int, Shape, Kinds], threading.Lock] = {}
_locks_guard = threading.Lock()


@lru_cache(maxsize=CACHED_LAYOUTS)
def _cached(name: str, version: int, shape: Shape, kinds: Kinds = ()) -> Drawing:
    began = time.monotonic()
    svg = run_dot(dot_source(shape, kinds), steps=len(shape))
    return Drawing(svg, node_ids(shape), time.monotonic() - began)


def draw(workflow: Workflow) -> Drawing:
    """The workflow's DAG, laid out once per (name, version, shape, kinds): LayoutError
    when it cannot be (not cached, so installing Graphviz fixes the page without a
    restart)."""
    key = (workflow.name, workflow.version, shape_of(workflow), kinds_of(workflow))
    with _locks_guard:
        lock = _locks.setdefault(key, threading.Lock())
    # One layout per key at a time: concurrent first views wait for it, not run dot too.
    with lock:
        return _cached(*key)


def draw_steps(names: Sequence[str], kinds: Kinds = ()) -> Drawing:
    """Steps without a registered definition (its version is gone): unconnected nodes,
    shaped by ``kinds`` (the step rows' kinds, in the same order)."""
    shape: Shape = tuple((name, ()) for name in names)
    return _cached("(unregistered)", 0, shape, tuple(kinds))
