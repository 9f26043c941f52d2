#!/usr/bin/env bash
# The CUDA paths on one GPU, as one command (a few minutes): chunked KL at a 128k vocabulary
# in bf16, the torch trainer in bf16, DeepSpeed ZeRO-2 bf16, the HF and vLLM generators
# (vLLM tests skip without the `gpu` extra), OPD on CUDA. Needs a CUDA torch and the
# project's dependencies; run from the repository root on the GPU machine:
#   bash scripts/gpu_check.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PY:-python3}"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
exec "$PY" -m pytest -m gpu tests/gpu -q -rA -s -p no:cacheprovider "$@"
