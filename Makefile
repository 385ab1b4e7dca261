# The two commands: `make run` (conveyor's demo on the embedded default) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: deps venv test lint typecheck pytest run migrate bench docs clean

deps:
	@VENV=$(VENV) scripts/bootstrap.sh

venv:
	@VENV=$(VENV) scripts/bootstrap.sh --venv-only

lint: deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: deps
	$(BIN)/mypy core worker conveyor bench

# Three workers, a test file each at a time (each worker starts its own PostgreSQL and
# Redis); the fault suite after them, on two workers: each fault test runs its own
# cluster, Redis and PostgreSQL, and its time is waits (stall timeouts, outages), not
# CPU: two at a time, each test took as long as alone (4:37 for the suite, not 6:52).
# --durations: where the suite's time goes, printed at the end of each run.
pytest: deps
	$(BIN)/pytest -n 3 --dist loadfile --ignore=tests/faults --durations=15
	$(BIN)/pytest -n 2 --dist loadfile tests/faults --durations=10

test: lint typecheck pytest

run: venv
	$(BIN)/python -m conveyor.cli.demo

# Plain Celery, DBOS and conveyor side by side on a durable PostgreSQL (docs/benchmarks.md).
bench: deps
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m bench.run

# The documentation site, into site/ (strict: a broken link or reference fails it).
docs: deps
	$(BIN)/python docs/hooks/pages.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

migrate: deps
	$(BIN)/alembic upgrade head

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache conveyor.db conveyor.db-*
