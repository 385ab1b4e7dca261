"""What `pip install conveyor` gets: a wheel built from the tracked files holds the
dashboard's templates and static files and every migration (package data, not code),
and no generic top-level package (an `api` or `cli` of the user's own would be shadowed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The top-level names the wheel may install: conveyor, and those the user's migration
# guide and the layout name.
TOP_LEVEL = {"conveyor", "core", "worker", "migrations"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of what git tracks (the build leaves nothing in the
    checkout)."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    tracked = (
        subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    source = tmp_path / "source"
    for name in filter(None, tracked):
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), "."],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (built,) = tmp_path.glob("conveyor-*.whl")
    return built


def test_the_wheel_carries_templates_static_files_and_migrations(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())

    def shipped(folder: str, pattern: str) -> set[str]:
        return {p.relative_to(REPO).as_posix() for p in (REPO / folder).glob(pattern)}

    expected = (
        shipped("conveyor/api/templates", "*.html")
        | shipped("conveyor/api/static", "*")
        | shipped("migrations/versions", "*.py")
        | {
            "migrations/env.py",
            "conveyor/api/app.py",
            "worker/app.py",
            "core/models.py",
            "conveyor/cli/main.py",
        }
    )
    assert len(expected) > 20
    assert expected <= names, sorted(expected - names)
    assert not any(name.startswith("tests/") for name in names)


def test_the_wheel_installs_no_generic_top_level_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == TOP_LEVEL


def test_a_project_with_its_own_api_and_cli_packages_imports_both(
    wheel: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with zipfile.ZipFile(wheel) as archive:  # a wheel is a zip of what site-packages gets
        archive.extractall(site)
    project = tmp_path / "project"
    for package in ("api", "cli"):
        (project / package).mkdir(parents=True)
        (project / package / "__init__.py").write_text(f"OWN = {package!r}\n")
    program = (
        "import api, cli\n"
        "assert (api.OWN, cli.OWN) == ('api', 'cli'), (api, cli)\n"
        "from conveyor import Workflow, enqueue\n"
        "import conveyor.api.app, conveyor.cli.main\n"
        "print('both', api.__file__, conveyor.__file__)\n"
    )
    # The dependencies from this environment's site-packages, after the wheel's: added
    # through PYTHONPATH, which reads no .pth file, so this checkout's editable install
    # (a .pth there) stays out and only the wheel provides conveyor.
    deps = sysconfig.get_paths()["purelib"]
    env = {**os.environ, "PYTHONPATH": f"{project}{os.pathsep}{site}{os.pathsep}{deps}"}
    result = subprocess.run(
        [str(python), "-c", program], cwd=project, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "both" in result.stdout
    assert str(site) in result.stdout
