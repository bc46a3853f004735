# Every target sets up its own environment: `make venv` (a stamp file keeps re-runs fast).
#
#   make demo                          the main job: data -> train -> evaluate -> export -> serve -> BLEU
#   make demo DEMO_ARGS="--minutes 2"  ... with a shorter training budget (scripts/demo.py --help)
#   make test                          lint, type checks and the test suite
#   make bench                         benchmarks on the demo's model (BENCH_ARGS to change)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_ARGS ?=
BENCH_ARGS ?= --checkpoint work/demo/run/final.pt --bundle work/demo/bundle
PYTEST_ARGS ?=
# A Multi30k copy next to the checkout (../shared/data/multi30k, as the tests use) spares the download;
# an NMT_DATA_DIR set by the caller wins.
SHARED_DATA := $(abspath ../shared/data/multi30k)
ifneq ($(wildcard $(SHARED_DATA)/train.en.gz),)
export NMT_DATA_DIR ?= $(SHARED_DATA)
endif
# Type-checked packages (the ones that exist).
TYPED := $(wildcard nmt train export serve bench scripts)

.PHONY: help venv test lint proto demo bench

help:
	@echo "make demo | test | lint | proto | bench | venv   (DEMO_ARGS, BENCH_ARGS, PYTEST_ARGS pass flags)"

# torch first: users' pip picks the right build for their machine (CUDA on Linux with a GPU), and a
# local CPU wheel where one is configured; the project's `torch==2.13.0` pin is then already met.
$(STAMP): pyproject.toml $(wildcard serve/engine/csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install 'torch==2.13.0'
	$(BIN)/python -m pip install -e '.[train,dev,bench,marian]'
	touch $@

venv: $(STAMP)

# Lint, types and tests all run (and all report) even when an earlier one fails.
test: venv
	@status=0; \
	$(BIN)/ruff check . || status=1; \
	$(BIN)/mypy $(TYPED) || status=1; \
	$(BIN)/python -m pytest $(PYTEST_ARGS) || status=1; \
	exit $$status

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy $(TYPED)

proto: venv
	$(BIN)/python scripts/gen_protos.py

demo: venv
	$(BIN)/python scripts/demo.py $(DEMO_ARGS)

bench: venv
	$(BIN)/python -m nmt bench $(BENCH_ARGS)
