"""Group-relative advantage estimators for GRPO (pure math: torch + stdlib only).

For each prompt the policy samples G completions with rewards `R_1..R_G`; every
completion gets one scalar advantage computed from its own group only.

Estimators (registry `ADVANTAGE_ESTIMATORS`, one signature
`(rewards_NG: (num_groups, G) float tensor, *, eps: float) -> advantages_NG`):
- `grpo` (DeepSeekMath): `A_i = (R_i - mean(R)) / (std(R) + eps)` with the UNBIASED
  standard deviation (Bessel, divide by G - 1), as `torch.std` in TRL's GRPOTrainer and
  verl. A group whose rewards are all equal gets A = 0. Needs G >= 2.
- `dr_grpo` (Dr. GRPO, Liu et al. 2025): `A_i = R_i - mean(R)`; no division by the std,
  which the paper shows biases updates toward groups of low reward variance. `eps` is
  accepted for the shared signature and unused.

The estimators compute in float64 and return the rewards' dtype. `compute_advantages` is
what GRPO calls: plain lists of rewards per group in, plain lists of advantages out.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from engine.registry import Registry

Tensor = torch.Tensor
AdvantageFn = Callable[..., Tensor]  # (rewards_NG, *, eps) -> advantages_NG

ADVANTAGE_ESTIMATORS: Registry[AdvantageFn] = Registry("advantage estimator")
register_advantage_estimator = ADVANTAGE_ESTIMATORS.register
get_advantage_estimator = ADVANTAGE_ESTIMATORS.get
DEFAULT_EPS = 1e-6


def _check_rewards_2d(rewards_NG: Tensor, min_group: int) -> None:
    if not isinstance(rewards_NG, Tensor) or rewards_NG.dim() != 2:
        shape = tuple(rewards_NG.shape) if isinstance(rewards_NG, Tensor) else type(rewards_NG).__name__
        raise ValueError(f"rewards must be a (num_groups, G) tensor, got {shape}")
    if not rewards_NG.is_floating_point():
        raise ValueError(f"rewards must be floating point, got {rewards_NG.dtype}")
    if rewards_NG.shape[1] < min_group:
        raise ValueError(f"rewards groups have G={rewards_NG.shape[1]} samples; this estimator needs G >= {min_group}")
    if not torch.isfinite(rewards_NG).all():
        bad = (~torch.isfinite(rewards_NG)).nonzero()[0].tolist()
        raise ValueError(f"rewards contain a non-finite value at (group, sample) {tuple(bad)}")


@register_advantage_estimator("grpo")
def compute_group_normalized_advantages(rewards_NG: Tensor, *, eps: float = DEFAULT_EPS) -> Tensor:
    """`(R - mean) / (std_unbiased + eps)` within each group (row)."""
    _check_rewards_2d(rewards_NG, min_group=2)
    r = rewards_NG.double()  # (N, G)
    centered = r - r.mean(dim=1, keepdim=True)  # (N, G)
    std = r.std(dim=1, unbiased=True, keepdim=True)  # (N, 1)
    return (centered / (std + eps)).to(rewards_NG.dtype)


@register_advantage_estimator("dr_grpo")
def compute_mean_centered_advantages(rewards_NG: Tensor, *, eps: float = DEFAULT_EPS) -> Tensor:
    """`R - mean` within each group (row); `eps` unused (shared signature)."""
    _check_rewards_2d(rewards_NG, min_group=1)
    r = rewards_NG.double()  # (N, G)
    return (r - r.mean(dim=1, keepdim=True)).to(rewards_NG.dtype)


def compute_advantages(rewards_by_group: Sequence[Sequence[float]], estimator: str,
                       eps: float = DEFAULT_EPS) -> list[list[float]]:
    """Each group's advantages from its own rewards alone (groups may differ in size): the
    estimator applied to one float32 (1, G) row per group, the precision GRPO trains with."""
    fn = get_advantage_estimator(estimator)
    out = []
    for i, rewards in enumerate(rewards_by_group):
        try:
            out.append(fn(torch.tensor([list(rewards)], dtype=torch.float32), eps=eps)[0].tolist())  # (G,)
        except ValueError as e:
            raise ValueError(f"group {i}: {e}") from None
    return out
