"""conveyor's command line: ``conveyor`` (cli.main) and the demo (``python -m cli.demo``)."""
