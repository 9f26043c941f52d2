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

`compute_grpo_advantages` also takes flat rewards (N,) with a group id per sample (groups
may have different sizes) and `broadcast_to_tokens` spreads sequence advantages over a
loss mask. The advantages are computed in float64 and returned in the rewards' dtype.
"""

from __future__ import annotations

from typing import Callable

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


def compute_grpo_advantages(rewards: Tensor, group_ids: Tensor | None = None, *, estimator: str = "grpo",
                            eps: float = DEFAULT_EPS) -> Tensor:
    """Per-sequence advantages.

    rewards (num_groups, G) with `group_ids=None` -> (num_groups, G); or rewards (N,) with
    group_ids (N,) integer labels (groups may be of different sizes, members need not be
    contiguous) -> (N,), each sample normalised within its own group.
    """
    fn = get_advantage_estimator(estimator)
    if group_ids is None:
        if rewards.dim() != 2:
            raise ValueError(f"rewards of shape {tuple(rewards.shape)} need group_ids, or pass (num_groups, G)")
        return fn(rewards, eps=eps)
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"flat rewards (N,) need group_ids (N,); got rewards {tuple(rewards.shape)}, "
                         f"group_ids {tuple(group_ids.shape)}")
    if group_ids.is_floating_point():
        raise ValueError(f"group_ids must be integers, got {group_ids.dtype}")
    out = torch.empty_like(rewards)  # (N,)
    for gid in torch.unique(group_ids).tolist():
        idx = (group_ids == gid).nonzero().squeeze(1)  # (g,)
        try:
            out[idx] = fn(rewards[idx].unsqueeze(0), eps=eps)[0]
        except ValueError as e:
            raise ValueError(f"group {gid}: {e}") from None
    return out


def broadcast_to_tokens(advantages_B: Tensor, mask_BT: Tensor) -> Tensor:
    """Sequence advantages (B,) -> per-token advantages (B, T), zero where mask is 0."""
    if advantages_B.dim() != 1 or mask_BT.dim() != 2 or mask_BT.shape[0] != advantages_B.shape[0]:
        raise ValueError(f"advantages (B,) and mask (B, T) expected; got {tuple(advantages_B.shape)} "
                         f"and {tuple(mask_BT.shape)}")
    return advantages_B.unsqueeze(1) * (mask_BT > 0).to(advantages_B.dtype)  # (B, T)
