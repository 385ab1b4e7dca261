"""What `pip install conveyor` gets: a wheel built from the tracked files holds the
dashboard's templates and static files and every migration (package data, not code)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_wheel_carries_templates_static_files_and_migrations(tmp_path: Path) -> None:
    # Built from a copy of what git tracks, so the build leaves nothing in the checkout.
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
    (wheel,) = tmp_path.glob("conveyor-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    def shipped(folder: str, pattern: str) -> set[str]:
        return {p.relative_to(REPO).as_posix() for p in (REPO / folder).glob(pattern)}

    expected = (
        shipped("api/templates", "*.html")
        | shipped("api/static", "*")
        | shipped("migrations/versions", "*.py")
        | {"migrations/env.py", "api/app.py", "worker/app.py", "core/models.py", "cli/main.py"}
    )
    assert len(expected) > 20
    assert expected <= names, sorted(expected - names)
    assert not any(name.startswith("tests/") for name in names)
