# The two commands: `make run` (conveyor's demo on the embedded default) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: deps venv test lint typecheck pytest run migrate bench clean

deps:
	@VENV=$(VENV) scripts/bootstrap.sh

venv:
	@VENV=$(VENV) scripts/bootstrap.sh --venv-only

lint: deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: deps
	$(BIN)/mypy core worker cli api

pytest: deps
	$(BIN)/pytest

test: lint typecheck pytest

run: venv
	$(BIN)/python -m cli.demo

# Plain Celery, DBOS and conveyor side by side on a durable PostgreSQL (docs/benchmarks.md).
bench: deps
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m bench.run

migrate: deps
	$(BIN)/alembic upgrade head

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache conveyor.db conveyor.db-*
