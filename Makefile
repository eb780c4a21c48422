# Every target works on a fresh clone with only Python 3.11 present.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit bench overload soak wrk install clean models debs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,package]'
	touch $(STAMP)

install: $(STAMP)

models: $(STAMP)
	@test -f models/cancer/v1/manifest.json -a -f models/cancer/v2/manifest.json \
		|| $(BIN)/mlproxy demo-models

run: $(STAMP) models
	$(BIN)/mlproxy serve --config config.toml

lint: $(STAMP)
	$(BIN)/ruff check proxy tests bench
	$(BIN)/ruff format --check proxy tests bench
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP)
	$(BIN)/mypy

debs:
	./tools/ensure-debs.sh

unit: $(STAMP) debs
	$(BIN)/pytest

test: lint typecheck unit

wrk:
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)

bench: $(STAMP) models wrk
	$(BIN)/python bench/throughput.py

overload: $(STAMP) models wrk
	$(BIN)/python bench/overload.py

soak: $(STAMP) models wrk
	$(BIN)/python bench/soak.py

clean:
	rm -rf $(VENV) models .pytest_cache .mypy_cache .ruff_cache
