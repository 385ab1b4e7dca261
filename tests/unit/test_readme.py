"""The README's configuration table lists every setting, with its real default."""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr

from core.config import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


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


def test_every_setting_is_documented_with_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("CONVEYOR_")]:
        monkeypatch.delenv(name)
    table = _table()
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    expected = {
        f"CONVEYOR_{name.upper()}": _normalise(getattr(defaults, name))
        for name in Settings.model_fields
    }
    assert set(table) == set(expected)
    assert {name: _normalise(cell) for name, cell in table.items()} == expected


def test_every_test_the_readme_cites_exists() -> None:
    # The guarantees table proves each row by naming tests: a renamed or removed test
    # would leave a claim with no proof.
    cited = set(re.findall(r"`(test_[a-z0-9_]+)`", README.read_text()))
    tests = README.parent / "tests"
    defined = {
        name
        for path in tests.rglob("test_*.py")
        for name in re.findall(r"^\s*(?:async )?def (test_[a-z0-9_]+)", path.read_text(), re.M)
    }
    assert sorted(cited - defined) == []
