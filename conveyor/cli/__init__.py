"""conveyor's command line: ``conveyor`` (``conveyor.cli.main``) and the demo
(``python -m conveyor.cli.demo``)."""
