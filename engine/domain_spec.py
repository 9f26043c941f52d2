"""`DomainSpec`: what a stage driver (GRPO, mixed RL, OPD) knows about one domain."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DomainSpec:
    verifier: str  # the `rewards` verifier that scores the domain's completions
    environment: object | None = None  # the tool environment of a multi-turn domain, else None
    modes: dict | None = None  # mode name -> engine.modes.ModeSettings: GRPO's reward shaping per sample's mode
    max_new_tokens: int | None = None  # an OPD route's own budget (its mode's); None: the stage's max_new_tokens
