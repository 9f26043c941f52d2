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

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_gpu = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
    # The experiments (tests/quality: the tiny one, ~25 min on 2 cores, and the modes one,
    # ~17 min) go first: under `make test`'s `-n 2 --dist loadfile --no-loadscope-reorder`
    # each worker starts with one file, so each starts one experiment at once, and the
    # worker that finishes its experiment first runs the other files. Stable sort: the rest
    # keeps its collection order.
    items.sort(key=lambda item: 0 if item.get_closest_marker("quality") else 1)
