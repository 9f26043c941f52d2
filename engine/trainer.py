"""The trainer interface (docs/CONTRACTS.md "Trainer"), its settings, and the factory.

Backends: `torch` (`engine/trainer_torch.py`, one process) and `deepspeed`
(`engine/trainer_deepspeed.py`, ZeRO 0-3, one rank per process; `pipeline/actors.py`
runs several ranks as Ray actors behind the same methods). What both share is in
`engine/trainer_common.py`, which imports neither, so the back-ends never import this
module.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Protocol

import torch

from engine.trainer_common import LossFn

if TYPE_CHECKING:
    from engine.trainer_settings import TrainerSettings

_SETTINGS_NAMES = ("BACKENDS", "TrainerSettings", "with_overrides")


def __getattr__(name: str):
    """`TrainerSettings`, `with_overrides`, `BACKENDS` re-exported lazily: the settings are a
    pydantic model, and the trainers themselves run without pydantic (tests/gpu)."""
    if name in _SETTINGS_NAMES:
        from engine import trainer_settings

        return getattr(trainer_settings, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Trainer(Protocol):
    def train_step(self, micro_batches: list[dict], loss_fn: LossFn) -> dict: ...
    def forward_logprobs(self, batch: dict) -> torch.Tensor: ...
    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def save_checkpoint(self, path: str | os.PathLike, extra_state: dict) -> None: ...
    def load_checkpoint(self, path: str | os.PathLike) -> dict: ...
    def save_hf(self, path: str | os.PathLike) -> None: ...


def build_trainer(settings: TrainerSettings, model_dir: str | os.PathLike, *,
                  tokenizer_dir: str | os.PathLike | None = None, rank: int = 0, world_size: int = 1):
    """A local trainer for `settings.backend` over the HF model in `model_dir`.

    `rank`/`world_size` > 1: one data-parallel rank (the process group is formed from the
    RANK/WORLD_SIZE/MASTER_* environment; `pipeline.actors` runs the ranks), both backends.
    """
    tok = str(tokenizer_dir or model_dir)
    if settings.backend == "torch":
        from engine.trainer_torch import TorchTrainer

        return TorchTrainer(settings, str(model_dir), tokenizer_dir=tok, rank=rank, world_size=world_size)
    if settings.backend == "deepspeed":
        from engine.trainer_deepspeed import DeepSpeedTrainer

        return DeepSpeedTrainer(settings, str(model_dir), tokenizer_dir=tok, rank=rank, world_size=world_size)
    from engine.trainer_settings import BACKENDS

    raise KeyError(f"unknown trainer backend {settings.backend!r}; known: {list(BACKENDS)}")
