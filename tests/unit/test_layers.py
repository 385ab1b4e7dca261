"""core <- worker <- api, cli: core imports neither Celery nor FastAPI, nor connects; and a
plain install (no extras) runs the worker, beat and CLI without the web stack."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]


def test_core_imports_no_celery_fastapi_or_worker() -> None:
    modules = sorted(p.stem for p in (REPO / "core").glob("*.py") if p.stem != "__init__")
    program = (
        "import sys\n"
        + "".join(f"import core.{m}\n" for m in modules if m != "database_manager")
        + "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('celery', 'kombu', 'fastapi', 'worker')"
        " or m.startswith(('conveyor.api', 'conveyor.cli')))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "", "CONVEYOR_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"},
    )
    assert result.stdout.strip() == ""


# What only the `api` and `flower` extras install: a worker, beat or the CLI never needs it.
WEB_ONLY = ("fastapi", "starlette", "uvicorn", "flower", "tornado")


def test_worker_core_and_cli_import_no_web_framework() -> None:
    """`pip install conveyor` (no extras) is enough for the worker, beat and the CLI."""
    cli = sorted(
        f"conveyor.cli.{p.stem}"
        for p in (REPO / "conveyor" / "cli").glob("*.py")
        if p.stem not in ("__init__", "__main__")
    )
    modules = ["worker.app", "core", *cli]
    # tenacity imports tornado when it happens to be installed (here it is, for flower), so
    # tornado is left to the dependency check below.
    web = tuple(m for m in WEB_ONLY if m != "tornado")
    program = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {web!r})\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "", "CONVEYOR_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"},
    )
    assert result.stdout.strip() == ""


def _requirements(name: str, extras: frozenset[str]) -> set[tuple[str, frozenset[str]]]:
    """The installed distribution's requirements that apply with these extras."""
    found = set()
    for line in importlib.metadata.requires(name) or []:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": e}) for e in extras | {""}):
            found.add((canonicalize_name(requirement.name), frozenset(requirement.extras)))
    return found


def test_a_plain_install_pulls_no_web_framework() -> None:
    """Neither pyproject's base dependencies nor what they pull in name the web stack."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    assert base.isdisjoint(WEB_ONLY)
    extras = project["optional-dependencies"]
    assert {"fastapi", "uvicorn"} <= {canonicalize_name(Requirement(r).name) for r in extras["api"]}
    assert "flower" in {canonicalize_name(Requirement(r).name) for r in extras["flower"]}

    # The closure, as installed here: celery[redis], alembic, typer... bring none of it.
    seen: set[str] = set()
    todo = _requirements("conveyor", frozenset())
    while todo:
        name, extras_wanted = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo |= _requirements(name, extras_wanted)
        except importlib.metadata.PackageNotFoundError:
            continue  # not for this platform or Python (its marker said so)
    assert seen.isdisjoint(WEB_ONLY), sorted(seen & set(WEB_ONLY))
