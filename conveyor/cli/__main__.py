"""``python -m conveyor.cli``: the ``conveyor`` command."""

from conveyor.cli.main import app

app(prog_name="conveyor")
