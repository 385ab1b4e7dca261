"""Graphviz lays out the dashboard's DAGs: a 50-wide fan-out and 1,000 steps, one SVG node
per step, within the timeout; without ``dot`` the page is told why, nothing raises."""

from __future__ import annotations

import random
import re
import time
from typing import Any

import pytest

from conveyor.api.ui import graph
from core.workflows import Step, StepContext, Workflow
from tests.e2e.workflows import FAN_WIDTH, fan


def _run(ctx: StepContext, **upstream: Any) -> int:
    return len(upstream)


def layered(name: str, layers: int, width: int) -> Workflow:
    """``layers`` x ``width`` steps, each after two random steps of the layer before."""
    chooser = random.Random(9)
    workflow = Workflow(name)
    previous: list[str] = []
    for layer in range(layers):
        current = [f"l{layer:02d}_{index:02d}" for index in range(width)]
        for step_name in current:
            upstream = tuple(chooser.sample(previous, 2)) if previous else ()
            workflow.add_step(Step(name=step_name, fn=_run, depends_on=upstream))
        previous = current
    return workflow


def nodes(svg: str) -> list[str]:
    """The element ids of the step nodes of a drawing."""
    return re.findall(r'<g id="(step&#45;\d+)" class="node step">', svg)


def test_a_50_wide_fan_out_and_1000_steps_are_laid_out_with_one_node_per_step() -> None:
    began = time.monotonic()
    wide = graph.draw(fan)
    fan_seconds = time.monotonic() - began
    assert len(nodes(wide.svg)) == FAN_WIDTH + 2 == len(wide.node_ids)
    assert wide.svg.startswith('<svg class="dag-svg"')
    assert " width=" not in wide.svg.split(">", 1)[0]  # scaled by its viewBox
    assert fan_seconds < 5

    big = layered("thousand", 20, 50)
    began = time.monotonic()
    drawn = graph.draw(big)
    seconds = time.monotonic() - began
    assert len(nodes(drawn.svg)) == 1000
    assert set(drawn.node_ids.values()) == {f"step-{i}" for i in range(1000)}
    assert seconds < graph.DOT_TIMEOUT
    # Cached per (workflow, version, shape): the page's next view runs no dot.
    began = time.monotonic()
    assert graph.draw(big) is drawn
    assert time.monotonic() - began < 0.05
    print(f"dot: 50-wide fan-out {fan_seconds:.2f} s, 1,000 steps {seconds:.2f} s")


def test_step_names_are_escaped_in_the_dot_source() -> None:
    source = graph.dot_source((('a"b', ()), ("c\\", ('a"b',))))
    assert '"a\\"b" [id="step-0", class="step"];' in source
    assert '"c\\\\" [id="step-1", class="step"];' in source
    assert '"a\\"b" -> "c\\\\";' in source


def test_without_dot_the_drawing_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(graph.LayoutError, match="apt-get install graphviz"):
        graph.run_dot(graph.dot_source(graph.shape_of(fan)), steps=52)


def test_a_layout_past_its_timeout_is_an_error_not_a_hang() -> None:
    big = layered("slow_to_draw", 20, 50)
    with pytest.raises(graph.LayoutError, match="took over"):
        graph.run_dot(graph.dot_source(graph.shape_of(big)), steps=1000, timeout=0.05)
