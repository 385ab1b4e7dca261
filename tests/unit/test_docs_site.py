"""The documentation site builds in strict mode (a broken link or anchor, a missing
reference or a page left out of the navigation fails it), and its generated pages hold
what they are made from: README as the home page, every setting with its docstring, the
public API's docstrings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from core.config import Settings

REPO = Path(__file__).resolve().parents[2]


def test_the_configuration_page_is_the_settings_class_as_it_is() -> None:
    # Kept in the repository for README's link; made from core/config.py, so a setting
    # added, changed or described anew without `make docs` fails here.
    sys.path.insert(0, str(REPO / "docs" / "hooks"))
    try:
        from pages import settings_page
    finally:
        sys.path.remove(str(REPO / "docs" / "hooks"))
    assert (REPO / "docs" / "configuration.md").read_text() == settings_page(), (
        "docs/configuration.md is out of date: run `make docs`"
    )


def test_the_site_builds_strictly_with_the_guides_settings_and_reference(
    tmp_path: Path,
) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    configuration = (site / "configuration" / "index.html").read_text()
    for name in Settings.model_fields:
        assert f"CONVEYOR_{name.upper()}" in configuration, name
    assert "Seconds a retention pass rests between full batches" in configuration
    home = (site / "index.html").read_text()
    assert "Your own workflows" in home
    assert 'href="guides/testing/"' in home  # README's docs/guides/testing.md, on the site
    operating = (site / "guides" / "operating" / "index.html").read_text()
    assert "test_sigkill_storm_loses_nothing" in operating  # the guarantees table
    reference = (site / "reference" / "index.html").read_text()
    assert "current code" in reference  # conveyor.testing.ConveyorTest.replay
    assert "Retention" in reference
