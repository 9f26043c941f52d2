"""Optimisers and learning-rate schedules for the trainer backends.

- `adamw`: torch AdamW over every parameter (weight decay off for biases and norms).
- `muon`: `torch.optim.Muon` on the 2-D weight matrices of the hidden layers, AdamW on
  everything else (embeddings, LM head, norms, biases), as Moonlight / DeepSeek-V4 do.
  Muon's step is rescaled to AdamW's update RMS (`adjust_lr_fn="match_rms_adamw"`,
  Moonlight's recipe) so one learning rate serves both halves. Departure: the paper's
  Muon is used as-is (no distributed Newton-Schulz); under DeepSpeed it needs ZeRO 0
  and fp32 because ZeRO flattens parameters into 1-D partitions.

Schedules are multiplicative factors of the base LR per optimiser step `s` (0-based):
warmup `(s + 1) / warmup_steps` for `s < warmup_steps`, then `constant`, or a `linear`
/ `cosine` decay from 1 to `min_lr_ratio` at `total_steps`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("constant", "linear", "cosine")


def is_muon_param(name: str, param: torch.Tensor) -> bool:
    """A 2-D weight matrix inside the transformer blocks (not embeddings or the LM head)."""
    if param.ndim != 2:
        return False
    lowered = name.lower()
    return not any(k in lowered for k in ("embed", "lm_head", "wte", "wpe"))


def _no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")


def adamw_param_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    decay = [p for n, p in named if not _no_decay(n, p)]
    no_decay = [p for n, p in named if _no_decay(n, p)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class MuonAdamW(torch.optim.Optimizer):
    """Muon on `muon_params`, AdamW on `adam_groups`, stepped together as one optimiser.

    The two inner optimisers share this object's `param_groups` (the same dicts, Muon's
    first) and `state`, so LR schedulers, gradient clipping, `state_dict` and
    `load_state_dict` treat it like any single torch optimiser.
    """

    def __init__(self, muon_params: list[nn.Parameter], adam_groups: list[dict], *, lr: float,
                 weight_decay: float, betas: tuple[float, float], eps: float, momentum: float = 0.95):
        if not muon_params:
            raise ValueError("MuonAdamW: no 2-D hidden weight matrices to give Muon")
        self._muon = torch.optim.Muon(muon_params, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      adjust_lr_fn="match_rms_adamw")
        # no AdamW part when every trainable weight is a hidden matrix (LoRA adapters)
        self._adam = torch.optim.AdamW(adam_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay) \
            if adam_groups else None
        groups = self._muon.param_groups + (self._adam.param_groups if self._adam is not None else [])
        super().__init__(groups, defaults={"lr": lr})
        self.param_groups = groups  # the very dicts the inner optimisers hold
        self._num_muon_groups = len(self._muon.param_groups)
        self._link()

    def _link(self) -> None:
        k = self._num_muon_groups
        self._muon.param_groups = self.param_groups[:k]
        self._muon.state = self.state
        if self._adam is not None:
            self._adam.param_groups = self.param_groups[k:]
            self._adam.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # replaces self.state and the group dicts
        self._link()

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._muon.step()
        if self._adam is not None:
            self._adam.step()
        return loss


def build_optimizer(model: nn.Module, name: str, *, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.Optimizer:
    """`adamw` or `muon` (Muon on hidden 2-D matrices + AdamW on the rest)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(adamw_param_groups(named, weight_decay), lr=lr, betas=betas, eps=eps)
    if name == "muon":
        muon = [p for n, p in named if is_muon_param(n, p)]
        rest = [(n, p) for n, p in named if not is_muon_param(n, p)]
        return MuonAdamW(muon, adamw_param_groups(rest, weight_decay), lr=lr, weight_decay=weight_decay,
                         betas=betas, eps=eps)
    raise KeyError(f"unknown optimizer {name!r}; known: {list(OPTIMIZERS)}")


def compute_lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int,
                      min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base LR at optimiser step `step` (0-based)."""
    if schedule not in SCHEDULES:
        raise KeyError(f"unknown lr schedule {schedule!r}; known: {list(SCHEDULES)}")
    if step < 0:
        raise ValueError(f"lr schedule: step must be >= 0, got {step}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    if schedule == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, *, schedule: str, warmup_steps: int,
                    total_steps: int, min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    if schedule not in SCHEDULES:
        raise KeyError(f"unknown lr schedule {schedule!r}; known: {list(SCHEDULES)}")

    def factor(step: int) -> float:
        return compute_lr_factor(step, schedule=schedule, warmup_steps=warmup_steps,
                                 total_steps=total_steps, min_lr_ratio=min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
