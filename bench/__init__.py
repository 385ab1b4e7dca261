"""Benchmarks (programs, not tests): ``python -m bench.run [--quick]``.

Each figure is printed as one line, ``name key=value ... value=<number>``; see
``docs/benchmarks.md`` for the latest results and the machine they ran on.
"""
