"""GRPO reward shaping per reasoning mode (DeepSeek-V4's modes; engine/modes.py).

- non-think: a response that writes `<think>` tokens loses `think_penalty` of its reward
  (1.0: zeroed); the prompt already closed an empty `<think></think>`.
- think-high: a linear length penalty, `length_penalty` per model token past `length_budget`.
- think-max: no shaping; its budget is only its generation cap.

`compute_mode_rewards` is the pure math (torch only, flat hyperparameters);
`shape_mode_rewards` applies it to a batch whose samples may come from several modes.
"""

from __future__ import annotations

import torch


def compute_mode_rewards(rewards_B: torch.Tensor, lengths_B: torch.Tensor, think_B: torch.Tensor, kind: str, *,
                         length_budget: int | None = None, length_penalty: float = 0.0,
                         think_penalty: float = 1.0) -> torch.Tensor:
    """Shaped rewards (B,) of one mode. `lengths_B`: model tokens of each response;
    `think_B`: whether it wrote think tokens (bool)."""
    if kind == "non-think":
        return rewards_B * (1.0 - think_penalty * think_B.to(rewards_B.dtype))  # (B,)
    if kind == "think-high":
        if length_budget is None:
            return rewards_B.clone()
        over_B = (lengths_B.to(rewards_B.dtype) - length_budget).clamp(min=0.0)  # (B,)
        return rewards_B - length_penalty * over_B
    if kind == "think-max":
        return rewards_B.clone()
    raise ValueError(f"unknown mode {kind!r}; known: ['non-think', 'think-high', 'think-max']")


def shape_mode_rewards(rewards: list[float], texts: list[str], lengths: list[int], modes: list[str | None],
                       settings: dict) -> list[float]:
    """Each sample's reward shaped by its own mode (`settings[mode]`: engine.modes.ModeSettings);
    samples without a mode are unchanged."""
    from engine.modes import has_think_tokens

    out = list(map(float, rewards))
    for mode in sorted({m for m in modes if m is not None}):
        idx = [i for i, m in enumerate(modes) if m == mode]
        s = settings[mode]
        shaped = compute_mode_rewards(
            torch.tensor([out[i] for i in idx], dtype=torch.float64), torch.tensor([lengths[i] for i in idx]),
            torch.tensor([has_think_tokens(texts[i]) for i in idx]), mode, length_budget=s.length_budget,
            length_penalty=s.length_penalty, think_penalty=s.think_penalty)
        for i, v in zip(idx, shaped.tolist()):
            out[i] = v
    return out
