"""Settings of a GRPO stage (one domain's expert, or the mixed-RL baseline)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, PositiveInt, model_validator

from engine.settings import Settings, registry_name

# The names of the registries in experts/advantages.py and experts/losses.py (torch
# modules), listed here so that a config is checked without importing torch.
ADVANTAGE_ESTIMATOR_NAMES = ("grpo", "dr_grpo")
POLICY_LOSS_NAMES = ("grpo", "vanilla", "gspo")
KL_ESTIMATOR_NAMES = ("k1", "k2", "k3", "unbiased_k3")


class GRPOSettings(Settings):
    HASH_NEUTRAL_DEFAULTS: ClassVar[dict] = {"micro_batch_tokens": None}

    steps: PositiveInt = 20
    prompts_per_step: PositiveInt = 16
    group_size: int = Field(8, ge=2, description="G samples per prompt")
    max_new_tokens: PositiveInt = 64
    max_turns: PositiveInt = Field(3, description="assistant turns in a tool episode")
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # optimisation
    lr: float = Field(5e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, gt=0.0)
    epochs_per_step: PositiveInt = 1
    mini_batches_per_step: PositiveInt = 1
    micro_batch_size: PositiveInt = 32
    micro_batch_tokens: PositiveInt | None = Field(
        None, description="padding-free training: a step's samples packed into rows as long as its longest "
        "sample, micro-batches of at most this many tokens (micro_batch_size is then unused); the old/reference "
        "log-probs too. None: micro_batch_size samples per micro-batch, right-padded")
    # algorithm
    advantage: Annotated[str, registry_name("advantage estimator", ADVANTAGE_ESTIMATOR_NAMES)] = "grpo"
    policy_loss: Annotated[str, registry_name("policy loss", POLICY_LOSS_NAMES)] = "grpo"
    clip_low: float = Field(0.2, gt=0.0, lt=1.0)
    clip_high: float = Field(0.28, gt=0.0)
    kl_beta: float = Field(0.0, ge=0.0)
    kl_estimator: Annotated[str, registry_name("KL estimator", KL_ESTIMATOR_NAMES)] = "k3"
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    offpolicy_mask_delta: float | None = Field(
        None, gt=0.0, description="DeepSeek-V3.2: mask a negative-advantage sequence whose mean "
                                  "log(pi_rollout / pi_theta) exceeds this (None: off)")
    tis_cap: float | None = Field(None, gt=0.0)
    dynamic_sampling: bool = False
    max_sampling_rounds: PositiveInt = 3
    overlong_filter: bool = False
    format_weight: float = Field(0.0, ge=0.0, le=1.0)
    # bookkeeping
    save_every: PositiveInt = 10
    keep_last: PositiveInt = 2
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        if self.prompts_per_step * self.group_size < self.mini_batches_per_step:
            raise ValueError("mini_batches_per_step exceeds the samples of a step")
        return self
