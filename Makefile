# Every target works on a fresh clone with only Python 3.11 present.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit bench overload soak vs-mlserver mlserver-venv wrk install clean models debs

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

# Seldon MLServer for bench/vs_mlserver.py, in a venv of its own: its pins are not ours
MLSERVER_VENV := .venv-mlserver
mlserver-venv: $(MLSERVER_VENV)/bin/mlserver

$(MLSERVER_VENV)/bin/mlserver:
	$(PYTHON) -m venv $(MLSERVER_VENV)
	$(MLSERVER_VENV)/bin/pip install --quiet mlserver==1.7.1 mlserver-sklearn==1.7.1

vs-mlserver: $(STAMP) models wrk mlserver-venv
	$(BIN)/python bench/vs_mlserver.py

clean:
	rm -rf $(VENV) $(MLSERVER_VENV) models .pytest_cache .mypy_cache .ruff_cache
