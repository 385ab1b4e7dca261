"""The deployment files agree with the code: docker-compose.yml, the Dockerfile, the
Procfile and .dockerignore (no Docker engine here: they are read, not run)."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return document


def healthcheck_command(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(test)


def test_every_long_running_service_has_a_healthcheck() -> None:
    services = compose()["services"]
    long_running = {name for name, s in services.items() if s.get("restart") != "no"}
    assert {"postgres", "redis", "worker", "beat", "api", "flower"} <= long_running
    assert sorted(n for n in long_running if "healthcheck" not in services[n]) == []
    assert "inspect ping" in healthcheck_command(services["worker"])
    assert "celerybeat-schedule" in healthcheck_command(services["beat"])


def test_the_api_service_serves_the_app_and_is_checked_on_a_route_it_has() -> None:
    from conveyor.api.app import app  # the dev install has the api extra

    api = compose()["services"]["api"]
    assert api["command"][:2] == ["uvicorn", "conveyor.api.app:app"]
    (port,) = api["ports"]
    assert port.startswith("${API_BIND:-127.0.0.1}:"), "published on this machine only"
    path = re.search(r"127\.0\.0\.1:8000(/\w+)", healthcheck_command(api))
    assert path is not None
    assert path.group(1) in app.openapi()["paths"]


def test_flower_is_checked_on_its_unauthenticated_page() -> None:
    from flower.urls import handlers

    flower = compose()["services"]["flower"]
    path = re.search(r"127\.0\.0\.1:5555(/\w+)", healthcheck_command(flower))
    assert path is not None
    # Flower's routes: tornado URLSpecs and (pattern, handler) tuples.
    patterns = [h[0] if isinstance(h, tuple) else h.regex.pattern for h in handlers]
    assert any(re.fullmatch(p.rstrip("$"), path.group(1)) for p in patterns)
    (port,) = flower["ports"]
    assert port.startswith("${FLOWER_BIND:-127.0.0.1}:")


def test_compose_builds_the_dockerfile_and_migrates_first() -> None:
    document = compose()
    build = document["x-conveyor"]["build"]
    assert build == {"context": "."}, "the repository's Dockerfile, not an inline one"
    services = document["services"]
    assert services["migrate"]["command"] == ["conveyor", "migrate"]
    for name in ("worker", "beat", "api"):
        assert services[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }


def test_the_dockerfile_installs_every_package_with_the_api_and_flower_extras() -> None:
    lines = (REPO / "Dockerfile").read_text().splitlines()
    instructions = [line for line in lines if line and not line.startswith(("#", " "))]
    assert [i for i in instructions if i.startswith("FROM ")][-1] == "FROM python:3.11-slim"
    copied = {shlex.split(i)[-1].removeprefix("./") for i in instructions if i.startswith("COPY ")}
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {p.rstrip("*") for p in find["packages"]["find"]["include"]}
    assert packages <= copied, f"packages not copied into the image: {packages - copied}"
    text = "\n".join(lines)
    assert "[api,flower]" in text
    users = [i.split()[1] for i in instructions if i.startswith("USER ")]
    assert users
    assert users[-1] not in {"root", "0"}
    assert "CONVEYOR_WORKFLOW_MODULES=" in text


def test_the_build_context_leaves_secrets_and_state_out() -> None:
    ignored = set((REPO / ".dockerignore").read_text().splitlines())
    assert {".env", ".venv", ".git", "conveyor.db*", "celerybeat-schedule*"} <= ignored


def test_procfile_processes_exec_and_release_migrates() -> None:
    processes = dict(
        line.split(":", 1)
        for line in (REPO / "Procfile").read_text().splitlines()
        if line and not line.startswith("#")
    )
    processes = {name: command.strip() for name, command in processes.items()}
    assert processes["release"] == "conveyor migrate"
    assert processes["web"].startswith("exec uvicorn conveyor.api.app:app ")
    for name in ("web", "worker", "beat", "flower"):
        assert re.search(r"(^|&& )exec ", processes[name]), name
