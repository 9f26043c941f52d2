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

VERIFIERS: Registry[Verifier] = Registry("verifier", builtins=_BUILTIN_MODULES, imports=True)
REFERENCE_CHECKS: Registry[ReferenceCheck] = Registry("reference check for verifier")
register = VERIFIERS.register  # @register("name") on `(completion, reference, **options) -> RewardResult`
register_reference_check = REFERENCE_CHECKS.register  # @register_reference_check("name"), once per verifier
known_verifiers = VERIFIERS.names


def get_verifier(name: str) -> Verifier:
    """The verifier under `name`; `package.module:function` imports the user's own,
    wrapped so that it may return a RewardResult, a number in [0, 1] (a bool counts) or
    `{"score", "info"}` (engine.plugins). It runs where built-in verifiers run: in the
    scoring workers (rewards.batch), under the same per-item time limit, and an exception
    or a hang scores that item 0 with the reason."""
    fn = VERIFIERS.get(name)
    if ":" not in name:
        return fn

    def user_verifier(completion: str, reference: Any, **options: Any) -> RewardResult:
        return as_reward(fn(completion, reference, **options), name)

    return user_verifier


def as_reward(value: Any, name: str) -> RewardResult:
    """A user verifier's return value as a RewardResult (a TypeError says what it was)."""
    if isinstance(value, RewardResult):
        return value
    if isinstance(value, (bool, int, float)):
        return RewardResult(float(value))
    if isinstance(value, dict) and "score" in value:
        return RewardResult(value["score"], dict(value.get("info") or {}))
    raise TypeError(f"verifier {name!r} returned {type(value).__name__} {value!r:.80}; "
                    "return a number in [0, 1], {'score': ..., 'info': {...}} or a RewardResult")


def check_reference(verifier: str, reference: Any) -> str | None:
    """Why `verifier` cannot score against `reference`, or None (also for a verifier
    without a registered check). An unknown verifier is a KeyError listing the known ones."""
    get_verifier(verifier)
    return REFERENCE_CHECKS.get(verifier)(reference) if verifier in REFERENCE_CHECKS else None
