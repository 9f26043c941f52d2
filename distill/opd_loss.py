"""The OPD loss the trainer runs on each micro-batch (docs/DESIGN.md section 4).

`OPDLoss(hidden, lm_head_weight, batch)`: the student's hidden states at the positions
that predict response tokens, the teacher's cached pre-norm states for the same positions
(`batch["teacher_hidden"]`, row-major over (sample, position); a packed batch's rows hold
several samples each, in the cache's order), the teacher's head from a
`HeadManager` (one resident at a time, in ascending teacher order within an optimiser
step), and a chunked full-vocabulary divergence (`distill.kl`), weighted by the sample's
teacher weight and divided by the micro-batch's `global_tokens` (`loss_divisors`: the
mini-batch's response tokens, or its teacher's tokens times the teachers in the step).

Devices: everything runs where the student's hidden states are (the trainer's device):
the head manager is built on that device at the first call, and the cached states and the
token weights are moved there; CPU and CUDA take the same path. The loss is picklable (it
is sent to trainer ranks); its head manager is rebuilt on the receiving side.
Imports torch, safetensors, `distill.heads`/`distill.kl` and the pure-math `experts.losses`
only (no pydantic).
"""

from __future__ import annotations

import torch


def loss_divisors(tokens: list[int], teachers: list[int], aggregation: str,
                  samples: list[int] | None = None) -> list[float]:
    """The divisor of each micro-batch's summed divergence in one optimiser step.

    `tokens[i]`, `teachers[i]`, `samples[i]`: response tokens, teacher and sample count of
    micro-batch i (one teacher per micro-batch). The step's loss is sum_i loss_sum_i / divisor_i:
    - token_mean: every divisor is the step's token count (one mean over all tokens, so a
      teacher whose answers are long dominates the gradient);
    - teacher_token_mean: divisor_i = (tokens of teacher_i in the step) x (teachers in the
      step), i.e. the mean of the teachers' own token means;
    - sample_mean: every divisor is the step's sample count; each token's divergence is
      also weighted by 1 / its sample's response tokens (`row_token_weights`, in the
      loss), so the step's loss is the mean over samples of each sample's token mean
      (verl's seq-mean-token-mean): a 5-token answer counts as much as a 70-token episode.
    """
    if len(tokens) != len(teachers):
        raise ValueError(f"loss_divisors: {len(tokens)} token counts for {len(teachers)} teachers")
    if aggregation == "sample_mean":
        if samples is None or len(samples) != len(tokens):
            raise ValueError(f"loss_divisors: sample_mean needs one sample count per micro-batch, got {samples!r}")
        return [float(max(sum(samples), 1))] * len(tokens)
    if aggregation == "token_mean":
        return [float(max(sum(tokens), 1))] * len(tokens)
    if aggregation == "teacher_token_mean":
        per: dict[int, int] = {}
        for n, t in zip(tokens, teachers):
            per[t] = per.get(t, 0) + n
        return [float(max(per[t], 1) * len(per)) for t in teachers]
    raise ValueError(f"loss_divisors: unknown aggregation {aggregation!r} "
                     "(token_mean, teacher_token_mean, sample_mean)")


def compute_policy_gradient_term(h_s: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 advantages: torch.Tensor, token_weights: torch.Tensor, chunk_size: int,
                                 temperature: float = 1.0, behaviour_logprobs: torch.Tensor | None = None,
                                 clip_low: float = 0.2, clip_high: float = 0.28) -> tuple[torch.Tensor, dict]:
    """The reward's policy-gradient term on the sampled tokens, summed: (term, metrics).

    `behaviour_logprobs` None: plain REINFORCE, `-sum_i tw_i A_i log p_s(y_i | h_i)`.
    Otherwise the clipped, importance-weighted surrogate of GRPO
    (`experts.losses.compute_token_clipped_loss`, the same code):
    `-sum_i tw_i min(r_i A_i, clip(r_i, 1 - clip_low, 1 + clip_high) A_i)` with
    `r_i = p_s(y_i | h_i) / p_b(y_i)`, `p_b` the sampler's probability of the token
    (`behaviour_logprobs`, the generator's log-probs kept in rollouts.jsonl). At r = 1 its
    gradient is REINFORCE's; samples drawn by older weights (later mini-batches of a round,
    pipelined rounds, a second epoch) or by another numerics (a bf16 sampler) are reweighted,
    and the clip stops a token's ratio from pushing further once it left the trust region.
    Metrics (detached, means over the tokens): `ratio_mean`, `clip_frac_low`,
    `clip_frac_high`, `approx_kl` (k3 estimate of KL(p_b || p_s)), as GRPO logs them.

    Log-probs are under the sampler's `temperature`. h_s (N, H) post-norm, weight (V, H),
    targets, advantages, token_weights and behaviour_logprobs (N,). Chunked over tokens
    (`engine.logprobs.compute_target_logprobs`), so no (N, V) tensor is built."""
    from engine.logprobs import compute_target_logprobs

    if h_s.shape[0] == 0:
        return h_s.sum() * 0.0, {}
    logp, _ = compute_target_logprobs(h_s, weight, targets.to(h_s.device), chunk_size, temperature=temperature)  # (N,)
    tw = token_weights.to(device=logp.device, dtype=logp.dtype).detach()  # (N,)
    adv = advantages.to(device=logp.device, dtype=logp.dtype).detach()  # (N,)
    if behaviour_logprobs is None:
        return -(tw * adv * logp).sum(), {}
    from experts.losses import compute_token_clipped_loss

    old = behaviour_logprobs.to(device=logp.device, dtype=logp.dtype)[None]  # (1, N)
    per_token, metrics = compute_token_clipped_loss(logp[None], old, adv[None], torch.ones_like(old),
                                                    clip_low=clip_low, clip_high=clip_high)  # (1, N)
    return (tw * per_token[0]).sum(), {k: float(v) for k, v in metrics.items()}


class OPDLoss:
    """Picklable loss sent to the trainer: teacher head resident one at a time."""

    def __init__(self, head_paths: list[str], teacher_weights: list[float], divergence: str,
                 chunk_size: int, jsd_beta: float, head_dtype: torch.dtype | None = None, reward_weight: float = 0.0,
                 reward_temperature: float = 1.0, reward_ratio: str = "clip", reward_clip_low: float = 0.2,
                 reward_clip_high: float = 0.28):
        self.head_paths = list(head_paths)
        self.teacher_weights = list(teacher_weights)
        self.divergence = divergence
        self.chunk_size = chunk_size
        self.jsd_beta = jsd_beta
        self.head_dtype = head_dtype
        self.reward_weight = float(reward_weight)
        self.reward_temperature = float(reward_temperature)  # the rollouts' sampling temperature
        if reward_ratio not in ("clip", "none"):
            raise ValueError(f"OPDLoss: reward_ratio must be 'clip' or 'none', got {reward_ratio!r}")
        self.reward_ratio = reward_ratio  # clip: GRPO's clipped ratio to the sampler; none: REINFORCE
        self.reward_clip_low, self.reward_clip_high = float(reward_clip_low), float(reward_clip_high)
        self._heads = None
        self._step = None

    def __getstate__(self):
        return {**self.__dict__, "_heads": None, "_step": None}

    def heads_on(self, device: torch.device):
        """The head manager, on `device` (built at the first call)."""
        if self._heads is None:
            from distill.heads import HeadManager

            self._heads = HeadManager(self.head_paths, device=device, dtype=self.head_dtype)
        elif self._heads.device != torch.device(device):
            raise RuntimeError(f"OPDLoss: heads live on {self._heads.device}, the student is now on {device}")
        return self._heads

    @property
    def heads(self):
        if self._heads is None:
            raise RuntimeError("OPDLoss.heads: no micro-batch has run yet (the device is that of the first)")
        return self._heads

    def __call__(self, hidden, weight, batch):
        from distill.kl import compute_chunked_divergence

        heads = self.heads_on(hidden.device)
        step = int(batch["opt_step"])
        if step != self._step:
            if self._step is not None:
                heads.end_step()
            heads.begin_step()
            self._step = step
        t = int(batch["teacher_index"])
        loads_before = heads.total_loads
        head = heads.activate(t)
        loaded = heads.total_loads - loads_before
        mask = batch["loss_mask"][:, 1:] > 0  # (B, T-1): targets t>=1 predicted at t-1
        h_s = hidden[:, :-1][mask]  # (N, H)
        h_t = batch["teacher_hidden"]  # (N, Ht), same row-major order as the cache
        if h_s.shape[0] != h_t.shape[0]:
            raise RuntimeError(f"teacher {t}: {h_t.shape[0]} cached positions for {h_s.shape[0]} targets")
        w = torch.full((h_s.shape[0],), self.teacher_weights[t], dtype=torch.float32, device=h_s.device)  # (N,)
        if "row_token_weights" in batch:  # sample_mean: 1 / the row's response tokens, at each of its targets
            rw = batch["row_token_weights"].to(device=h_s.device, dtype=torch.float32)  # (B,), or (B, T) packed
            w = w * (rw[:, 1:][mask] if rw.dim() == 2 else rw[:, None].expand(mask.shape)[mask])
        loss_sum, per_token = compute_chunked_divergence(
            h_s, weight, h_t.to(device=h_s.device), head, w, kind=self.divergence,
            chunk_size=self.chunk_size, beta=self.jsd_beta)
        metrics = {}
        if self.reward_weight > 0 and "advantages" in batch:  # MOPD: plus the reward's policy gradient
            adv = batch["advantages"].to(device=h_s.device, dtype=torch.float32)  # (B,), or (B, T) packed
            adv = adv[:, 1:][mask] if adv.dim() == 2 else adv[:, None].expand(mask.shape)[mask]  # (N,)
            targets = batch["input_ids"][:, 1:][mask].to(h_s.device)  # (N,), the tokens h_s predicted
            behaviour = None
            if self.reward_ratio == "clip":
                if "rollout_logprobs" not in batch:
                    raise KeyError("OPDLoss: reward_ratio 'clip' needs the batch's rollout_logprobs (B, T)")
                behaviour = batch["rollout_logprobs"][:, 1:][mask].to(device=h_s.device, dtype=torch.float32)  # (N,)
            pg_sum, pg_metrics = compute_policy_gradient_term(
                h_s, weight, targets, adv, w * self.reward_weight, self.chunk_size,
                self.reward_temperature, behaviour, self.reward_clip_low, self.reward_clip_high)
            loss_sum = loss_sum + pg_sum
            metrics[f"pg_sum/teacher{t}"] = float(pg_sum.detach())
            metrics.update({f"pg_{k}": v for k, v in pg_metrics.items()})
        loss = loss_sum / batch["global_tokens"].to(loss_sum.device)
        n = per_token.numel()
        return loss, {"head_load_events": float(loaded),
                      "resident_heads": float(heads.max_resident_heads),
                      f"kl_sum/teacher{t}": float(per_token.sum()), f"kl_tokens/teacher{t}": float(n), **metrics}

    def finish(self) -> dict:
        if self._heads is None:
            return {"head_loads_per_step": [], "max_resident_heads": 0}
        if self._step is not None:
            self._heads.end_step()
            self._step = None
        return {"head_loads_per_step": list(self._heads.head_loads_per_step),
                "max_resident_heads": int(self._heads.max_resident_heads)}
