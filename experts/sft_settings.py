"""Settings of an SFT stage (torch-free, so configs load fast)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from engine.settings import Settings


class SFTSettings(Settings):
    steps: PositiveInt = 200
    batch_size: PositiveInt = Field(64, description="samples per optimiser step")
    micro_batch_size: PositiveInt = Field(64, description="rows per micro-batch (packed rows when pack)")
    max_length: PositiveInt = Field(256, description="tokens per sample (longer ones are cut); packed row length")
    pack: bool = False
    shuffle: bool = True
    # optimisation (passed to the trainer through `trainer_overrides`)
    lr: float = Field(3e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    grad_clip: float = Field(1.0, ge=0.0)
    # bookkeeping
    eval_every: int = Field(0, ge=0, description="steps between eval losses; 0 = at the end only")
    eval_batch_size: PositiveInt = 64
    save_every: PositiveInt = 50
    keep_last: PositiveInt = 2
    seed: int = 0

    def trainer_overrides(self) -> dict:
        """Fields of `TrainerSettings` this stage decides (`engine.trainer.with_overrides`)."""
        return {"lr": self.lr, "weight_decay": self.weight_decay, "schedule": self.schedule,
                "warmup_steps": self.warmup_steps, "total_steps": self.steps,
                "min_lr_ratio": self.min_lr_ratio, "grad_clip": self.grad_clip, "seed": self.seed}
