"""MkDocs hook: the site's pages made at build time from what they describe, so that
they cannot drift from it.

- Each guide is a section of README.md (its ``## `` heading and what follows, up to the
  next), with README's links to ``docs/...`` and to its own sections rewritten for the
  site.
- ``configuration.md`` is the table of ``core.config.Settings``: each field's variable,
  type, default and description.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]

# The site's guides: (page, title, README sections in order).
GUIDES: list[tuple[str, str, list[str]]] = [
    ("guides/workflows.md", "Workflows", ["Define a workflow", "Conditional steps"]),
    ("guides/enqueueing.md", "Enqueueing", ["Enqueue"]),
    ("guides/waiting.md", "Waiting", ["Waiting: sleep, events, approvals", "Child workflows"]),
    ("guides/maps.md", "Maps", ["Map steps"]),
    ("guides/limits.md", "Routing and limits", ["Routing, limits, rate limits and debounce"]),
    ("guides/schedules.md", "Schedules", ["Schedules"]),
    ("guides/testing.md", "Testing", ["Testing your workflows"]),
    ("guides/api.md", "HTTP API", ["HTTP API"]),
    ("guides/dashboard.md", "Dashboard", ["Dashboard"]),
    ("guides/deploying.md", "Deploying", ["Run it", "Deploy", "Deploying a changed workflow"]),
    (
        "guides/operating.md",
        "Operating",
        [
            "Retention",
            "Repairing an execution",
            "Metrics",
            "Logs, traces and Flower",
            "Guarantees and failure modes",
        ],
    ),
    ("guides/architecture.md", "Architecture", ["State model and guarantees", "Architecture"]),
    ("guides/migration.md", "Migrating", ["Migrating from `database_manager`"]),
]


def _sections(readme: str) -> dict[str, str]:
    """README's ``## `` sections by title, each with its heading."""
    parts = re.split(r"(?m)^## ", readme)
    return {part.split("\n", 1)[0].strip(): "## " + part for part in parts[1:]}


def _slug(title: str) -> str:
    """A heading's anchor as GitHub and MkDocs's toc make it."""
    text = re.sub(r"[^\w\- ]", "", title.lower())
    return text.replace(" ", "-")


def _rewritten(text: str, where: dict[str, str]) -> str:
    """README's links for a page of guides/: its files under docs/ are siblings of the
    guides' folder; a link to one of its sections goes to the page that holds it."""
    text = re.sub(r"\]\(docs/", "](../", text)
    text = re.sub(r'src="docs/', 'src="../', text)

    def section(match: re.Match[str]) -> str:
        anchor = match.group(1)
        page = where.get(anchor)
        return f"]({'../' + page if page else ''}#{anchor})"

    text = re.sub(r"\]\(#([\w\-]+)\)", section, text)
    # Links to files of the repository that are not pages: to their text on the site's
    # repository would need a URL; shown as code instead.
    return re.sub(r"\[([^\]]+)\]\((?!https?:|\.\./|#|mailto:)([^)]+)\)", r"\1 (`\2`)", text)


def _settings_page() -> str:
    from core.config import Settings

    lines = [
        "# Configuration",
        "",
        "Every setting is an environment variable (or a line of `.env`); this table is made",
        "from the settings class itself when the site is built.",
        "",
        "| variable | type | default | what it does |",
        "|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        kind = getattr(field.annotation, "__name__", str(field.annotation))
        default = (
            "(required)" if field.is_required() else field.get_default(call_default_factory=True)
        )
        if hasattr(default, "get_secret_value"):
            default = "(secret)"
        described = (field.description or "").replace("|", "\\|")
        lines.append(f"| `CONVEYOR_{name.upper()}` | `{kind}` | `{default}` | {described} |")
    return "\n".join(lines) + "\n"


def on_files(files: Files, config: MkDocsConfig, **_: Any) -> Files:
    """Add the made pages to the site."""
    readme = (ROOT / "README.md").read_text()
    sections = _sections(readme)
    where = {}
    for page, _, titles in GUIDES:
        for title in titles:
            for heading in re.findall(r"(?m)^#{2,4} (.+)$", sections[title]):
                where.setdefault(_slug(heading), page)
    made: dict[str, str] = {}
    for page, title, titles in GUIDES:
        missing = [t for t in titles if t not in sections]
        if missing:
            raise ValueError(f"README has no section {missing[0]!r} for {page}")
        body = "\n".join(_rewritten(sections[t], where) for t in titles)
        made[page] = f"# {title}\n\n" + body.replace("\n## ", "\n## ")
    made["configuration.md"] = _settings_page()
    for path, content in made.items():
        files.append(File.generated(config, path, content=content))
    return files
