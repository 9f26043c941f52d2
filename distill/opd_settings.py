"""Settings of the multi-teacher on-policy distillation stage."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, PositiveInt, model_validator

from engine.settings import Settings


class TeacherSpec(Settings):
    """A teacher: a domain's expert (default) or an external HF checkpoint."""

    HASH_NEUTRAL_DEFAULTS: ClassVar[dict] = {"share": 1.0}

    domain: str
    weight: float = Field(1.0, gt=0.0)
    share: float = Field(1.0, gt=0.0, description="its relative share of each round's prompts (distill.allocation)")
    path: str | None = Field(None, description="HF checkpoint; default: the domain's GRPO expert")
    mode: str | None = Field(None, description="the reasoning mode this teacher serves (route domain@mode); "
                                               "default: none (the domain's route)")


class OPDSettings(Settings):
    HASH_NEUTRAL_DEFAULTS: ClassVar[dict] = {"allocation": "fixed", "allocation_floor": 0.5, "reward_weight": 0.0,
                                             "reward_ratio": "clip", "reward_clip_low": 0.2, "reward_clip_high": 0.28,
                                             "micro_batch_tokens": None, "prefill_tokens": None}

    student_init: str = Field("sft:all", description="'base', 'sft:all', 'sft:<domain>' or a path")
    teachers: list[TeacherSpec] | None = Field(None, description="default: every domain's expert, weight 1")
    rounds: PositiveInt = 3
    prompts_per_domain: PositiveInt = 32
    samples_per_prompt: PositiveInt = 1
    allocation: Literal["fixed", "kl"] = Field(
        "fixed", description="how a round's prompts (prompts_per_domain x teachers) are split among the teachers: "
        "fixed: by each teacher's share (1 each by default); kl: share x the teacher's training KL of the last "
        "round known when the rollouts are drawn (distill.allocation)")
    allocation_floor: float = Field(0.5, ge=0.0, le=1.0, description="the fewest prompts a teacher gets in a "
                                    "round under allocation kl, as a fraction of prompts_per_domain (at least one)")
    max_new_tokens: PositiveInt = 64
    max_turns: PositiveInt = 3
    temperature: float = Field(1.0, ge=0.0)
    divergence: Literal["reverse_kl", "forward_kl", "jsd"] = "reverse_kl"
    jsd_beta: float = Field(0.5, ge=0.0, le=1.0)
    loss_aggregation: Literal["token_mean", "teacher_token_mean", "sample_mean"] = Field(
        "token_mean", description="token_mean: the step's summed divergence over all its response tokens "
        "(a teacher's share of the gradient grows with its answers' length); teacher_token_mean: each "
        "teacher's tokens averaged on their own, then the teachers in the step averaged (each counts the same); "
        "sample_mean: each sample's tokens averaged, then the step's samples (a short answer counts as much "
        "as a long episode)")
    reward_weight: float = Field(0.0, ge=0.0, description="weight of a policy-gradient term on the domain's "
                                 "verifier reward added to the divergence (MiMo's MOPD): -weight x A x log p of "
                                 "each sampled token, A the sample's reward z-scored within its prompt's "
                                 "samples_per_prompt samples (needs >= 2); 0: distillation alone")
    reward_ratio: Literal["clip", "none"] = Field(
        "clip", description="the reward term's correction for samples the current weights did not draw (later "
        "mini-batches of a round, pipelined rounds, epochs_per_round > 1, a sampler of other numerics): clip: GRPO's "
        "clipped surrogate, -min(r A, clip(r, 1 - reward_clip_low, 1 + reward_clip_high) A), r the token's "
        "probability now over the sampler's (rollouts.jsonl); none: plain REINFORCE, -A log p (biased once the "
        "policy has moved since sampling)")
    reward_clip_low: float = Field(0.2, gt=0.0, lt=1.0)
    reward_clip_high: float = Field(0.28, gt=0.0)
    chunk_size: PositiveInt = 1024
    cache_dtype: Literal["fp32", "bf16"] = "fp32"
    shard_tokens: PositiveInt = 65536
    prefill_batch_size: PositiveInt = 32
    prefill_tokens: PositiveInt | None = Field(
        None, description="padding-free teacher prefill: samples taken in order up to this many tokens per forward, "
        "packed into rows as long as the longest of them (prefill_batch_size is then unused). None: "
        "prefill_batch_size samples per forward, right-padded")
    keep_caches: int = Field(0, ge=0, description="round caches kept on disk (the newest); the others are "
                             "deleted once their round's checkpoint is written (rollouts are kept)")
    pipelined: bool = Field(False, description="round r+1's rollouts and teacher prefill run while round r "
                            "trains (its samples one round old at its first step, two rounds less one step at its "
                            "last; recorded per sample and step); false: synchronous rounds")
    # optimisation
    epochs_per_round: PositiveInt = 1
    mini_batch_size: PositiveInt = 64
    micro_batch_size: PositiveInt = 16
    micro_batch_tokens: PositiveInt | None = Field(
        None, description="padding-free training: each teacher's samples of a step packed into rows as long as "
        "the longest of them, micro-batches of at most this many tokens (micro_batch_size is then unused). "
        "None: micro_batch_size samples per micro-batch, right-padded")
    lr: float = Field(3e-4, gt=0.0)
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="over all rounds' optimiser steps (no warmup)")
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    heldout_prompts_per_domain: int = Field(0, ge=0, description="held-out prompts per teacher for the held-out KL (0: off)")
    heldout_every: PositiveInt = Field(1, description="rounds between held-out KL measurements (also before round 0 and after the last)")
    eval_prompts_per_round: int = Field(16, ge=0, description="held-out prompts per domain scored greedily after each round (0: off)")
    seed: int = 0

    @model_validator(mode="after")
    def _reward_needs_groups(self) -> "OPDSettings":
        if self.reward_weight > 0 and self.samples_per_prompt < 2:
            raise ValueError(f"reward_weight {self.reward_weight} needs samples_per_prompt >= 2 (the reward's "
                             f"baseline is the prompt's other samples), got {self.samples_per_prompt}")
        if self.reward_weight > 0 and self.temperature == 0:
            raise ValueError(f"reward_weight {self.reward_weight} needs temperature > 0: greedy samples of one "
                             "prompt are identical, so every advantage (reward z-scored within the prompt) is 0")
        return self
