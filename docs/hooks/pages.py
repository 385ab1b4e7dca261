"""MkDocs hook: the site's pages made at build time from what they describe, so that
they cannot drift from it.

- ``index.md`` (the home page) is README.md, with its links to ``docs/...`` made
  relative to the site's root.

``docs/configuration.md``, the table of ``core.config.Settings`` (each field's variable,
type, default and docstring), is made by ``settings_page`` and kept in the repository so
that README's link to it works where the site is not built; ``make docs`` writes it
again (``python docs/hooks/pages.py``) and tests/unit/test_docs_site.py fails when the
file differs from the settings class.

The guides are files of ``docs/guides/``; README links to them, so they read the same on
the site and in the repository.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

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


def _type_name(annotation: Any) -> str:
    """A setting's type as a reader says it: ``int or None``, ``'text' or 'json'``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin in (Union, UnionType):
        return " or ".join(_type_name(arg) for arg in args)
    if origin is Literal:
        return " or ".join(repr(arg) for arg in args)
    if annotation is type(None):
        return "None"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(arg) for arg in args)}]"
    return str(getattr(annotation, "__name__", annotation))


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


def settings_page() -> str:
    from core.config import Settings

    lines = [
        "# Configuration",
        "",
        "Every setting is an environment variable (or a line of `.env`); secrets are never",
        "logged. This table is made from the settings class, `core/config.py`, by `make docs`",
        "(a test checks it is current): each row is a field and its docstring.",
        "",
        "| variable | type | default | what it does |",
        "|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        kind = _type_name(field.annotation)
        default = (
            "(required)"
            if field.is_required()
            else _default(field.get_default(call_default_factory=True))
        )
        described = " ".join((field.description or "").split()).replace("|", "\\|")
        lines.append(f"| `CONVEYOR_{name.upper()}` | `{kind}` | `{default}` | {described} |")
    return "\n".join(lines) + "\n"


def on_files(files: Files, config: MkDocsConfig, **_: Any) -> Files:
    """Add the home page to the site."""
    files.append(File.generated(config, "index.md", content=_home_page()))
    return files


if __name__ == "__main__":
    # make docs: the configuration page, written from the settings class.
    import sys

    sys.path.insert(0, str(ROOT))
    (ROOT / "docs" / "configuration.md").write_text(settings_page())
