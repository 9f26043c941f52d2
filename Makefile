# Polymath: `make demo` runs the tiny experiment end to end on CPU; `make test` runs the tests.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export MPLCONFIGDIR := $(CURDIR)/.cache/matplotlib
export RAY_USAGE_STATS_ENABLED := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline
export DS_ACCELERATOR := cpu
export TOKENIZERS_PARALLELISM := false

.PHONY: setup quickstart demo test test-unit test-reliability test-quality test-vllm bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,bench]'
	touch $(STAMP)

setup: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/polymath run configs/small-hf.yaml logging.progress=true

demo: $(STAMP)
	$(BIN)/python -m pipeline run configs/tiny.yaml

test: $(STAMP)
	$(BIN)/python -m pytest tests -q -m "not gpu" --timeout 900 --durations=25 \
		-n 2 --dist loadfile --no-loadscope-reorder  # each worker starts one experiment (tests/quality: tiny, modes), then the rest

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit -q

test-reliability: $(STAMP)
	$(BIN)/python -m pytest tests/reliability -q -rA --timeout 900

test-quality: $(STAMP)
	$(BIN)/python -m pytest tests/quality -q -rA

test-vllm:
	bash scripts/test_vllm.sh

bench: $(STAMP)
	$(BIN)/python -m bench.run_all

clean:
	rm -rf runs .cache
