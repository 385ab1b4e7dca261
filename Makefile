# The two commands: `make run` (conveyor's demo on the embedded default) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: deps venv test lint typecheck pytest run migrate clean

deps:
	@VENV=$(VENV) scripts/bootstrap.sh

venv:
	@VENV=$(VENV) scripts/bootstrap.sh --venv-only

lint: deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: deps
	$(BIN)/mypy core worker cli

pytest: deps
	$(BIN)/pytest

test: lint typecheck pytest

run: venv
	$(BIN)/python -m cli.demo

migrate: deps
	$(BIN)/alembic upgrade head

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache conveyor.db conveyor.db-*
