"""Shared test setup: CPU only, deterministic, caches inside the checkout, few threads."""

import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(CACHE / "torch_extensions"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# vLLM's CPU build (tests/gpu/test_vllm_generator.py): loopback, a 1 GiB KV cache, caches in
# the checkout, and room for the first step's kernel compilation on a loaded machine.
for _k, _v in {"VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1",
               "DO_NOT_TRACK": "1", "VLLM_CACHE_ROOT": str(CACHE / "vllm"),
               "TORCHINDUCTOR_CACHE_DIR": str(CACHE / "inductor"), "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "1800"}.items():
    os.environ.setdefault(_k, _v)

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_gpu = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") and not has_gpu:  # the marker, not the tests/gpu directory's name
            item.add_marker(skip_gpu)
    # The experiments (tests/quality: the tiny one, ~25 min on 2 cores, and the modes one,
    # ~17 min) go first: under `make test`'s `-n 2 --dist loadfile --no-loadscope-reorder`
    # each worker starts with one file, so each starts one experiment at once, and the
    # worker that finishes its experiment first runs the other files. Stable sort: the rest
    # keeps its collection order.
    items.sort(key=lambda item: 0 if item.get_closest_marker("quality") else 1)
