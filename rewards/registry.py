"""The verifier registry: one signature for every reward, so RL and eval share it.

A verifier is `(completion: str, reference: dict, **options) -> RewardResult`. Built-in
verifiers live in their own modules and register themselves on import; `get_verifier`
imports them lazily, so `import rewards` stays cheap (no math-verify, no sympy).
Next to a verifier its module may register a reference check, `(reference) -> reason |
None`, the same test the verifier applies before scoring: `check_reference` lets data
loading reject a row whose reference no completion could ever score against.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from engine.registry import Registry

# Modules that hold the built-in verifiers, imported on first look-up.
_BUILTIN_MODULES = (
    "rewards.math_reward",
    "rewards.code_reward",
    "rewards.ifeval",
    "rewards.tool_reward",
    "rewards.format_reward",
)


@dataclasses.dataclass
class RewardResult:
    """A score in [0, 1] and what the verifier saw (extracted answer, failure reason)."""

    score: float
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        score = float(self.score)
        if not math.isfinite(score) or not 0.0 <= score <= 1.0:
            raise ValueError(f"RewardResult.score must be a finite number in [0, 1], got {self.score!r}")
        self.score = score

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "info": self.info}


Verifier = Callable[..., RewardResult]
ReferenceCheck = Callable[[Any], "str | None"]

VERIFIERS: Registry[Verifier] = Registry("verifier", builtins=_BUILTIN_MODULES)
REFERENCE_CHECKS: Registry[ReferenceCheck] = Registry("reference check for verifier")
register = VERIFIERS.register  # @register("name") on `(completion, reference, **options) -> RewardResult`
register_reference_check = REFERENCE_CHECKS.register  # @register_reference_check("name"), once per verifier
get_verifier = VERIFIERS.get
known_verifiers = VERIFIERS.names


def check_reference(verifier: str, reference: Any) -> str | None:
    """Why `verifier` cannot score against `reference`, or None (also for a verifier
    without a registered check). An unknown verifier is a KeyError listing the known ones."""
    get_verifier(verifier)
    return REFERENCE_CHECKS.get(verifier)(reference) if verifier in REFERENCE_CHECKS else None
