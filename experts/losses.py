"""GRPO policy losses, KL-to-reference estimators, masks and loss aggregation (pure math).

Imports torch and the stdlib only. All tensors are (B, T) and aligned with `input_ids`
(docs/CONTRACTS.md); `mask` is 1 where token t is trained. Ratios are `pi_theta/pi_old`.

- Policy losses (registry `POLICY_LOSSES`, one signature
  `(logprobs, old_logprobs, advantages, mask, *, clip_low, clip_high) -> (loss_BT, metrics)`):
  `grpo` (= `vanilla`): token-level `-min(r A, clip(r, 1-clip_low, 1+clip_high) A)`
  with separate bounds (clip-higher, DAPO). `gspo` (Zheng et al. 2025): ratio
  `s_i = exp(mean_t log r_t)` per sequence, clipped the same way; implemented as
  GSPO-token (value `s_i` at every token, gradient `s_i grad log pi_t`), which equals
  the sequence-level gradient under `seq-mean-token-mean` aggregation; like verl, the
  sequence log-ratio is capped at 10 for stability. Use GSPO's own (much smaller) clip
  ranges. Advantages may be per sequence (B,) or per token (B, T).
- KL estimators (registry `KL_ESTIMATORS`, `(logprobs, ref_logprobs, old_logprobs) -> (B, T)`),
  with `log_q = log(pi_ref/pi_theta)`: `k1 = -log_q`, `k2 = log_q^2 / 2`,
  `k3 = e^log_q - log_q - 1`, and `unbiased_k3` (DeepSeek-V3.2)
  `(pi_theta/pi_old) * k3`, unbiased for KL(pi_theta || pi_ref) when tokens were sampled
  from pi_old; its ratio is NOT detached (the gradient of the estimate is then the
  unbiased gradient of the KL). No clamping.
- `compute_offpolicy_sequence_mask` (DeepSeek-V3.2): keep mask (B,). As in the paper,
  `compute_policy_loss` measures `log(pi_old/pi_theta)` with pi_old the policy that
  SAMPLED the tokens: the generator's `rollout_logprobs` (behaviour log-probs), where
  train/inference mismatch and staleness show up. (The trainer's own old log-probs equal
  pi_theta on the first pass of a step, so a drift measured against them is 0.)
- `aggregate_loss` (the only place that reduces over tokens) and
  `compute_global_denominators`: pieces of a mini-batch divided by the whole mini-batch's
  denominators SUM to the whole batch's loss and gradient.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from engine.registry import Registry

Tensor = torch.Tensor
PolicyLossFn = Callable[..., "tuple[Tensor, dict[str, Tensor]]"]
KLFn = Callable[[Tensor, Tensor, Tensor], Tensor]
POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")
KL_ESTIMATORS: Registry[KLFn] = Registry("KL estimator")
register_policy_loss = POLICY_LOSSES.register
get_policy_loss = POLICY_LOSSES.get
register_kl_estimator = KL_ESTIMATORS.register
get_kl_estimator = KL_ESTIMATORS.get
AGGREGATION_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
GSPO_MAX_LOG_RATIO = 10.0


# ---------------------------------------------------------------- policy losses
def _token_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    if advantages.dim() == 1 and advantages.shape[0] == mask.shape[0]:
        return advantages.unsqueeze(1).expand_as(mask)  # (B, T)
    if advantages.shape == mask.shape:
        return advantages
    raise ValueError(f"advantages must be (B,) or (B, T) for mask {tuple(mask.shape)}, got {tuple(advantages.shape)}")


def _masked_mean(x: Tensor, m: Tensor) -> Tensor:
    return torch.where(m, x, 0).sum() / m.sum().clamp(min=1)


def _clipped_surrogate(ratio: Tensor, adv: Tensor, m: Tensor, clip_low: float, clip_high: float):
    """Per-token `-min(r A, clip(r) A)` (B, T), 0 off the mask, and its clip metrics."""
    loss = -torch.minimum(ratio * adv, ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv)  # (B, T)
    with torch.no_grad():
        r = ratio.detach()
        metrics = {  # fractions of masked tokens where the clipped branch is active (no gradient)
            "clip_frac_low": _masked_mean(((r < 1.0 - clip_low) & (adv < 0)).to(r.dtype), m),
            "clip_frac_high": _masked_mean(((r > 1.0 + clip_high) & (adv > 0)).to(r.dtype), m),
            "ratio_mean": _masked_mean(r, m),
            # k3 estimate of KL(pi_old || pi_theta) under pi_old samples
            "approx_kl": _masked_mean(r - 1.0 - torch.log(r), m),
        }
    return torch.where(m, loss, 0), metrics


@register_policy_loss("vanilla")
@register_policy_loss("grpo")
def compute_token_clipped_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                               clip_low: float, clip_high: float):
    """Token-level clipped surrogate (PPO/GRPO with clip-higher). Returns (loss (B,T), metrics)."""
    m = mask > 0
    log_ratio = torch.where(m, logprobs - old_logprobs, 0)  # (B, T)
    return _clipped_surrogate(torch.exp(log_ratio), _token_advantages(advantages, mask), m, clip_low, clip_high)


@register_policy_loss("gspo")
def compute_sequence_clipped_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                                  clip_low: float, clip_high: float):
    """GSPO: sequence ratio `exp(mean_t log r_t)` clipped per sequence (GSPO-token form)."""
    m = mask > 0
    n = m.sum(1).clamp(min=1)  # (B,)
    seq_log_ratio = torch.where(m, logprobs - old_logprobs, 0).sum(1) / n  # (B,)
    seq_log_ratio = seq_log_ratio.detach().clamp(max=GSPO_MAX_LOG_RATIO)
    lp = torch.where(m, logprobs, 0)
    log_ratio = lp - lp.detach() + seq_log_ratio.unsqueeze(1)  # (B, T), value s_i, grad of log pi_t
    return _clipped_surrogate(torch.exp(log_ratio), _token_advantages(advantages, mask), m, clip_low, clip_high)


# ---------------------------------------------------------------- KL to the reference
@register_kl_estimator("k1")
def compute_kl_k1(logprobs: Tensor, ref_logprobs: Tensor, old_logprobs: Tensor) -> Tensor:
    return logprobs - ref_logprobs  # (B, T)


@register_kl_estimator("k2")
def compute_kl_k2(logprobs: Tensor, ref_logprobs: Tensor, old_logprobs: Tensor) -> Tensor:
    return 0.5 * (logprobs - ref_logprobs).square()  # (B, T)


@register_kl_estimator("k3")
def compute_kl_k3(logprobs: Tensor, ref_logprobs: Tensor, old_logprobs: Tensor) -> Tensor:
    log_q = ref_logprobs - logprobs  # log(pi_ref / pi_theta), (B, T)
    return torch.exp(log_q) - log_q - 1.0


@register_kl_estimator("unbiased_k3")
def compute_kl_unbiased_k3(logprobs: Tensor, ref_logprobs: Tensor, old_logprobs: Tensor) -> Tensor:
    """DeepSeek-V3.2: `(pi_theta/pi_old) * (pi_ref/pi_theta - log(pi_ref/pi_theta) - 1)`."""
    return torch.exp(logprobs - old_logprobs) * compute_kl_k3(logprobs, ref_logprobs, old_logprobs)


# ---------------------------------------------------------------- masks and weights
def compute_offpolicy_sequence_mask(logprobs: Tensor, behaviour_logprobs: Tensor, advantages: Tensor,
                                    mask: Tensor, delta: float) -> Tensor:
    """Keep mask (B,) in logprobs' dtype: 0 for a sequence whose advantage is negative AND
    whose mean over its masked tokens of `log(pi_behaviour / pi_theta)` exceeds `delta`.
    Per-token advantages (B, T) are reduced to their masked mean. No gradient."""
    if not delta > 0:
        raise ValueError(f"offpolicy_mask_delta must be > 0, got {delta}")
    m = mask > 0
    n = m.sum(1).clamp(min=1)  # (B,)
    with torch.no_grad():
        mean_log = torch.where(m, behaviour_logprobs - logprobs, 0).sum(1) / n  # (B,)
        adv = advantages if advantages.dim() == 1 else torch.where(m, advantages, 0).sum(1) / n
        drop = (adv < 0) & (mean_log > delta)
    return (~drop).to(logprobs.dtype)


def compute_tis_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Truncated importance weights `min(pi_old / pi_rollout, cap)` (B, T), detached, 0 off the mask."""
    if not cap > 0:
        raise ValueError(f"tis_cap must be > 0, got {cap}")
    m = mask > 0
    with torch.no_grad():
        w = torch.exp(torch.where(m, old_logprobs - rollout_logprobs, 0)).clamp(max=cap)  # (B, T)
        return torch.where(m, w, 0)


# ---------------------------------------------------------------- aggregation
def _denominator(value, local: Tensor, name: str) -> Tensor:
    if value is None:
        return local.clamp(min=1)
    v = float(value)
    if not (v > 0 and v != float("inf")):
        raise ValueError(f"{name} must be a positive finite number, got {v}")
    return torch.tensor(v, dtype=local.dtype if local.is_floating_point() else torch.float32)


def aggregate_loss(loss_BT: Tensor, mask_BT: Tensor, mode: str, *, global_tokens=None, global_seqs=None,
                   max_len=None) -> Tensor:
    """Reduce a per-token loss to a scalar.

    token-mean:              sum_{b,t} m l / global_tokens
    seq-mean-token-mean:     sum_b (sum_t m l / n_b) / global_seqs        (n_b: b's tokens)
    seq-mean-token-sum-norm: sum_b (sum_t m l / max_len) / global_seqs    (Dr. GRPO)
    Without a global value, the local one is used (tokens; sequences with >= 1 token;
    the largest n_b). `max_len` may also be per sequence (B,): each sequence divided by
    its own constant (mixed domains, each with its own maximum response length). For a piece of a mini-batch pass the mini-batch's values
    (`compute_global_denominators`): the pieces' losses then SUM to the whole loss.
    """
    if loss_BT.shape != mask_BT.shape or loss_BT.dim() != 2:
        raise ValueError(f"loss and mask must both be (B, T); got {tuple(loss_BT.shape)}, {tuple(mask_BT.shape)}")
    if mode not in AGGREGATION_MODES:
        raise KeyError(f"unknown loss aggregation {mode!r}; known: {list(AGGREGATION_MODES)}")
    m = mask_BT > 0
    masked = torch.where(m, loss_BT, 0)  # (B, T)
    tokens_B = m.sum(1).to(loss_BT.dtype)  # (B,)
    if mode == "token-mean":
        return masked.sum() / _denominator(global_tokens, tokens_B.sum(), "global_tokens")
    seqs = _denominator(global_seqs, (tokens_B > 0).sum().to(loss_BT.dtype), "global_seqs")
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(1) / tokens_B.clamp(min=1)  # (B,)
    elif isinstance(max_len, Tensor) and max_len.dim() == 1:
        if max_len.shape[0] != loss_BT.shape[0]:
            raise ValueError(f"per-sequence max_len must be (B,) = ({loss_BT.shape[0]},), got {tuple(max_len.shape)}")
        if not (torch.isfinite(max_len) & (max_len > 0)).all():
            raise ValueError(f"max_len must be positive finite numbers, got {max_len.tolist()}")
        per_seq = masked.sum(1) / max_len.to(masked.dtype)  # (B,)
    else:
        local_max = tokens_B.max() if tokens_B.numel() else tokens_B.new_tensor(1.0)
        per_seq = masked.sum(1) / _denominator(max_len, local_max, "max_len")  # (B,)
    return per_seq.sum() / seqs


def compute_global_denominators(masks: Tensor | Sequence[Tensor], max_len: int | None = None) -> dict[str, float]:
    """Denominators of a whole mini-batch from its mask (B, T) or all its pieces' masks
    (micro-batches of every rank, any T each): global_tokens, global_seqs (sequences with
    at least one token), max_len (given, e.g. the generation budget for Dr. GRPO, else the
    longest sequence's token count). Each is at least 1."""
    masks = [masks] if isinstance(masks, Tensor) else list(masks)
    if not masks or any(mk.dim() != 2 for mk in masks):
        raise ValueError("masks must be a (B, T) tensor or a non-empty list of (B_i, T_i) tensors")
    tokens_B = torch.cat([(mk > 0).sum(1) for mk in masks])  # (B_total,)
    if max_len is not None and not max_len > 0:
        raise ValueError(f"max_len must be > 0, got {max_len}")
    longest = int(tokens_B.max()) if tokens_B.numel() else 0
    return {"global_tokens": float(max(int(tokens_B.sum()), 1)),
            "global_seqs": float(max(int((tokens_B > 0).sum()), 1)),
            "max_len": float(max_len if max_len is not None else max(longest, 1))}


# ---------------------------------------------------------------- composition
def _check_bt(name: str, x: Tensor | None, shape: torch.Size, mask: Tensor) -> None:
    if x is None:
        return
    if x.shape != shape:
        raise ValueError(f"{name} must be (B, T) = {tuple(shape)}, got {tuple(x.shape)}")
    if x.is_floating_point():
        bad = ~torch.isfinite(x) & (mask > 0)
        if bad.any():
            b, t = bad.nonzero()[0].tolist()
            raise ValueError(f"{name}[{b}, {t}] is {float(x[b, t])} at a trained token")


def compute_policy_loss(*, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                        ref_logprobs: Tensor | None = None, rollout_logprobs: Tensor | None = None,
                        policy_loss: str = "grpo", clip_low: float = 0.2, clip_high: float = 0.28,
                        kl_beta: float = 0.0, kl_estimator: str = "k3", loss_agg: str = "token-mean",
                        offpolicy_mask_delta: float | None = None, tis_cap: float | None = None,
                        global_tokens=None, global_seqs=None, max_len=None) -> tuple[Tensor, dict[str, float]]:
    """Scalar GRPO loss of a (piece of a) mini-batch and float metrics.

    per-token policy loss -> x TIS weight (`tis_cap`, needs `rollout_logprobs`) ->
    x off-policy sequence keep mask (`offpolicy_mask_delta`, against `rollout_logprobs`,
    the behaviour policy's; needs them) -> + kl_beta * KL estimate
    (needs `ref_logprobs` when kl_beta > 0; the KL term is neither TIS-weighted nor
    sequence-masked) -> `aggregate_loss(loss_agg, global_*)`. Off the mask every input
    is ignored (padding may hold anything).
    """
    shape = mask.shape
    if mask.dim() != 2:
        raise ValueError(f"mask must be (B, T), got {tuple(shape)}")
    for name, x in (("logprobs", logprobs), ("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs),
                    ("rollout_logprobs", rollout_logprobs)):
        _check_bt(name, x, shape, mask)
    _token_advantages(advantages, mask)  # shape check
    if not 0 < clip_low < 1 or not clip_high > 0:
        raise ValueError(f"need 0 < clip_low < 1 and clip_high > 0, got {clip_low}, {clip_high}")
    if kl_beta < 0:
        raise ValueError(f"kl_beta must be >= 0, got {kl_beta}")
    policy_fn, kl_fn = get_policy_loss(policy_loss), get_kl_estimator(kl_estimator)  # a typo fails at beta 0 too
    m = mask > 0
    safe = lambda x: torch.where(m, x, 0)  # noqa: E731  (padding may hold inf/nan)
    lp, old = safe(logprobs), safe(old_logprobs)
    pg, metrics = policy_fn(lp, old, advantages, mask, clip_low=clip_low, clip_high=clip_high)
    if tis_cap is not None:
        if rollout_logprobs is None:
            raise ValueError("tis_cap is set but rollout_logprobs were not given")
        w = compute_tis_weights(old, safe(rollout_logprobs), mask, tis_cap)  # (B, T)
        pg = pg * w
        metrics["tis_weight_mean"] = _masked_mean(w, m)
        metrics["tis_capped_frac"] = _masked_mean((w >= tis_cap).to(w.dtype), m)
    if offpolicy_mask_delta is not None:
        if rollout_logprobs is None:
            raise ValueError("offpolicy_mask_delta is set but rollout_logprobs (the behaviour policy's) were not given")
        keep = compute_offpolicy_sequence_mask(lp, safe(rollout_logprobs), advantages, mask,
                                               offpolicy_mask_delta)  # (B,)
        pg = pg * keep.unsqueeze(1)
        has_tokens = m.any(1)  # (B,) padding rows of a micro-batch are not sequences
        masked_n = ((keep < 1) & has_tokens).sum().to(lp.dtype)
        metrics["offpolicy_masked_frac"] = masked_n / has_tokens.sum().clamp(min=1)
        metrics["offpolicy_masked_seqs"] = masked_n
    metrics["pg_loss"] = _masked_mean(pg.detach(), m)
    total = pg
    if kl_beta > 0:
        if ref_logprobs is None:
            raise ValueError("kl_beta > 0 needs ref_logprobs (a reference model)")
        kl = kl_fn(lp, safe(ref_logprobs), old)  # (B, T)
        total = pg + kl_beta * kl
        metrics["kl"] = _masked_mean(kl.detach(), m)
    loss = aggregate_loss(total, mask, loss_agg, global_tokens=global_tokens, global_seqs=global_seqs,
                          max_len=max_len)
    metrics["loss"] = loss.detach()
    return loss, {k: float(v) for k, v in metrics.items()}
