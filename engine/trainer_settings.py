"""Trainer settings: how a stage's model is trained (torch-free, so configs load fast)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from engine.settings import Settings

BACKENDS = ("torch", "deepspeed")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraSettings(Settings):
    """`trainer.lora`: train low-rank adapters (peft LoRA) instead of the full model. The
    optimiser and resume hold the adapter weights only; the generator, `state_dict`, the
    checkpoints' HF weights and `final/` hold the merged model W + (alpha/r)·B·A, and
    `<checkpoint>/adapter/` (copied to `final/adapter/`) the adapter alone (peft format)."""

    r: PositiveInt = 8
    alpha: float = Field(16.0, gt=0.0, description="the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS), min_length=1,
                                      description="module names (suffixes) that get an adapter")


class TrainerSettings(Settings):
    """How a stage's model is trained. Stage settings override the optimisation fields
    through `with_overrides` (e.g. each stage's own `lr` and `steps`)."""

    HASH_NEUTRAL_DEFAULTS: ClassVar[dict] = {"gradient_checkpointing": False, "lora": None}

    backend: Literal["torch", "deepspeed"] = "torch"
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["fp32", "bf16"] = "fp32"
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage")
    optimizer: Literal["adamw", "muon"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0.0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    total_steps: PositiveInt | None = Field(None, description="optimiser steps; needed by linear/cosine")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    grad_clip: float = Field(1.0, ge=0.0, description="max global grad norm; 0 = no clipping")
    seed: int = 0
    deterministic: bool = True
    logprob_chunk: int = Field(0, ge=0, description="positions per log-softmax chunk; 0 = all at once")
    gradient_checkpointing: bool = Field(False, description="recompute each decoder layer's activations in "
                                         "backward instead of keeping them (transformers' gradient checkpointing, "
                                         "non-reentrant): less memory, one more forward per step")
    lora: LoraSettings | None = Field(None, description="train peft LoRA adapters only")

    @field_validator("betas")
    @classmethod
    def _betas(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"each beta must be in [0, 1), got {list(betas)}")
        return betas

    @model_validator(mode="after")
    def _check(self):
        if self.schedule != "constant" and self.total_steps is None:
            raise ValueError(f"schedule {self.schedule!r} needs total_steps")
        if self.optimizer == "muon" and self.backend == "deepspeed" and (self.zero_stage or self.dtype != "fp32"):
            raise ValueError("optimizer 'muon' under deepspeed needs zero_stage 0 and dtype fp32 "
                             "(ZeRO and the bf16 optimizer flatten the 2-D matrices Muon works on)")
        if self.backend == "torch" and self.zero_stage:
            raise ValueError("zero_stage is a deepspeed setting; backend 'torch' needs zero_stage 0")
        return self


def with_overrides(settings: TrainerSettings, **fields: Any) -> TrainerSettings:
    """A validated copy with some fields replaced (None values are ignored)."""
    data = settings.model_dump()
    data.update({k: v for k, v in fields.items() if v is not None})
    return TrainerSettings.model_validate(data)
