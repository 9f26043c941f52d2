"""`DomainSpec`: what a stage driver (GRPO, mixed RL, OPD) knows about one domain."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DomainSpec:
    verifier: str  # the `rewards` verifier that scores the domain's completions
    environment: object | None = None  # the tool environment of a multi-turn domain, else None
