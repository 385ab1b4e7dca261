"""MkDocs hook: the site's pages made at build time from what they describe, so that
they cannot drift from it.

- ``index.md`` (the home page) is README.md, with its links to ``docs/...`` made
  relative to the site's root.
- ``configuration.md`` is the table of ``core.config.Settings``: each field's variable,
  type, default and docstring.

The guides are files of ``docs/guides/``; README links to them, so they read the same on
the site and in the repository.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]


def _home_page() -> str:
    """README as the site's home: its ``docs/`` links point from the site's root, and
    links to files of the repository that are not pages are shown as code."""
    text = (ROOT / "README.md").read_text()
    text = re.sub(r"\]\(docs/", "](", text)
    text = re.sub(r'src="docs/', 'src="', text)
    return re.sub(r"\[([^\]]+)\]\((?!https?:|#|mailto:)([^)]+\.(?!md)\w+)\)", r"\1 (`\2`)", text)


def _default(value: object) -> str:
    """A setting's default as the environment would spell it."""
    if value is None:
        return "(none)"
    if hasattr(value, "get_secret_value"):
        value = value.get_secret_value()
    if isinstance(value, timedelta):
        days, rest = divmod(value.total_seconds(), 86400)
        return f"P{int(days)}D" if not rest else str(value.total_seconds())
    if isinstance(value, list):
        return ",".join(map(str, value)) or "(none)"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _settings_page() -> str:
    from core.config import Settings

    lines = [
        "# Configuration",
        "",
        "Every setting is an environment variable (or a line of `.env`); secrets are never",
        "logged. This table is made from the settings class, `core/config.py`, when the site",
        "is built: each row is a field and its docstring.",
        "",
        "| variable | type | default | what it does |",
        "|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        kind = getattr(field.annotation, "__name__", str(field.annotation))
        kind = kind.replace("typing.", "").replace("datetime.", "").replace("|", "or")
        default = (
            "(required)"
            if field.is_required()
            else _default(field.get_default(call_default_factory=True))
        )
        described = " ".join((field.description or "").split()).replace("|", "\\|")
        lines.append(f"| `CONVEYOR_{name.upper()}` | `{kind}` | `{default}` | {described} |")
    return "\n".join(lines) + "\n"


def on_files(files: Files, config: MkDocsConfig, **_: Any) -> Files:
    """Add the made pages to the site."""
    made = {"index.md": _home_page(), "configuration.md": _settings_page()}
    for path, content in made.items():
        files.append(File.generated(config, path, content=content))
    return files
