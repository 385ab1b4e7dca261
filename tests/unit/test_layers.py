"""core <- worker <- api, cli: core imports neither Celery nor FastAPI, nor connects."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_core_imports_no_celery_fastapi_or_worker() -> None:
    modules = sorted(p.stem for p in (REPO / "core").glob("*.py") if p.stem != "__init__")
    program = (
        "import sys\n"
        + "".join(f"import core.{m}\n" for m in modules if m != "database_manager")
        + "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('celery', 'kombu', 'fastapi', 'worker', 'api', 'cli'))\n"
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
