"""Settings of an SFT stage (torch-free, so configs load fast)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, PositiveInt, model_validator

from engine.settings import Settings


class SFTSettings(Settings):
    # added after runs existed: out of the stage hash while at these values (pipeline.graph._dump)
    HASH_NEUTRAL_DEFAULTS: ClassVar[dict] = {"pack_length": None, "loss_aggregation": "token_mean",
                                             "domain_shares": None}

    steps: PositiveInt = 200
    batch_size: PositiveInt = Field(64, description="samples per optimiser step")
    micro_batch_size: PositiveInt = Field(64, description="rows per micro-batch (packed rows when pack)")
    max_length: PositiveInt = Field(256, description="tokens per sample (longer ones are cut)")
    pack: bool = Field(False, description="pack samples into rows (best-fit decreasing) instead of padding each")
    pack_length: PositiveInt | None = Field(None, description="packed row length; default max_length")
    loss_aggregation: Literal["token_mean", "domain_token_mean"] = Field(
        "token_mean", description="token_mean: one mean over the step's targets; domain_token_mean: the mean of "
                                  "the domains' own token means (short answers are not drowned by long ones)")
    domain_shares: dict[str, float] | None = Field(
        None, description="with domain_token_mean: domain -> its weight in the step's loss (1 for a domain "
                          "not named); a domain's share is its weight over the sum of the step's domains' weights")
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

    @model_validator(mode="after")
    def _domain_shares_apply(self):
        if self.domain_shares is not None:
            if self.loss_aggregation != "domain_token_mean":
                raise ValueError("domain_shares needs loss_aggregation: domain_token_mean "
                                 f"(got {self.loss_aggregation!r}, which weighs tokens, not domains)")
            bad = {d: w for d, w in self.domain_shares.items() if not w > 0}
            if bad:
                raise ValueError(f"domain_shares must be positive, got {bad}")
        return self

    @model_validator(mode="after")
    def _pack_length_fits(self):
        if self.pack_length is not None and self.pack_length < self.max_length:
            raise ValueError(f"pack_length ({self.pack_length}) must be >= max_length ({self.max_length}), "
                             "or a sample cannot fit a row")
        return self

    def trainer_overrides(self) -> dict:
        """Fields of `TrainerSettings` this stage decides (`engine.trainer.with_overrides`)."""
        return {"lr": self.lr, "weight_decay": self.weight_decay, "schedule": self.schedule,
                "warmup_steps": self.warmup_steps, "total_steps": self.steps,
                "min_lr_ratio": self.min_lr_ratio, "grad_clip": self.grad_clip, "seed": self.seed}
