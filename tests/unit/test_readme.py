"""What README and the guides say about the code stays true: the settings README lists
have their real defaults, every setting has a description for the configuration page,
and every test the documentation cites as proof exists."""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr

from core.config import Settings

README = Path(__file__).resolve().parents[2] / "README.md"
DOCS = README.parent / "docs"


def _table() -> dict[str, str]:
    rows = re.findall(r"^\| `(CONVEYOR_[A-Z_]+)` \| ([^|]+) \|", README.read_text(), re.M)
    return {name: default.strip() for name, default in rows}


def _normalise(cell: object) -> object:
    """A README cell or a default value, compared by meaning (``30`` equals ``30.0``)."""
    if cell is None:
        return "(none)"
    if isinstance(cell, timedelta):  # README writes whole days in ISO 8601: P30D
        days, rest = divmod(cell.total_seconds(), 86400)
        return f"P{int(days)}D" if not rest else cell.total_seconds()
    if isinstance(cell, SecretStr):
        cell = cell.get_secret_value()
    if isinstance(cell, list):
        cell = ",".join(cell) or "(none)"
    text = str(cell).strip().strip("`")
    if text == "forever":  # a retention setting's None
        return "(none)"
    if isinstance(cell, bool):
        text = text.lower()
    try:
        return float(text)
    except ValueError:
        return text


def test_the_settings_readme_lists_have_their_real_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [n for n in os.environ if n.startswith("CONVEYOR_")]:
        monkeypatch.delenv(name)
    table = _table()
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    expected = {
        f"CONVEYOR_{name.upper()}": _normalise(getattr(defaults, name))
        for name in Settings.model_fields
    }
    assert table, "README's settings table is gone"
    assert set(table) <= set(expected), sorted(set(table) - set(expected))
    assert {name: _normalise(cell) for name, cell in table.items()} == {
        name: expected[name] for name in table
    }


def test_every_setting_has_a_description_for_the_configuration_page() -> None:
    # The site's configuration page is made from these (docs/hooks/pages.py): a setting
    # added without a docstring would be listed there with nothing said about it.
    assert [name for name, field in Settings.model_fields.items() if not field.description] == []


def test_every_test_the_documentation_cites_exists() -> None:
    # The guarantees table proves each row by naming tests: a renamed or removed test
    # would leave a claim with no proof.
    pages = [README, *DOCS.rglob("*.md")]
    cited = {
        name for page in pages for name in re.findall(r"`(test_[a-z0-9_]+)`", page.read_text())
    }
    assert len(cited) > 50  # the guarantees table is among the pages read
    tests = README.parent / "tests"
    defined = {
        name
        for path in tests.rglob("test_*.py")
        for name in re.findall(r"^\s*(?:async )?def (test_[a-z0-9_]+)", path.read_text(), re.M)
    } | {path.stem for path in tests.rglob("test_*.py")}  # a test module cited by name
    assert sorted(cited - defined) == []
