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
import importlib
import math
from typing import Any, Callable

# Modules that hold the built-in verifiers, imported on first look-up.
_BUILTIN_MODULES = (
    "rewards.math_reward",
    "rewards.code_reward",
    "rewards.ifeval",
    "rewards.tool_reward",
    "rewards.format_reward",
)

_REGISTRY: dict[str, Callable[..., "RewardResult"]] = {}
_REFERENCE_CHECKS: dict[str, Callable[[Any], "str | None"]] = {}
_builtins_loaded = False


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


def register(name: str) -> Callable[[Verifier], Verifier]:
    """Decorator: register `fn` under `name`; a second registration of a name is an error."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"verifier name must be a non-empty string, got {name!r}")

    def deco(fn: Verifier) -> Verifier:
        if name in _REGISTRY:
            raise ValueError(f"verifier {name!r} is already registered (by {_REGISTRY[name].__module__})")
        _REGISTRY[name] = fn
        return fn

    return deco


def register_reference_check(name: str) -> Callable[[Callable[[Any], str | None]], Callable[[Any], str | None]]:
    """Decorator: register `check(reference) -> reason | None` for verifier `name`; once per name."""
    def deco(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
        if name in _REFERENCE_CHECKS:
            raise ValueError(f"reference check for {name!r} is already registered (by {_REFERENCE_CHECKS[name].__module__})")
        _REFERENCE_CHECKS[name] = check
        return check

    return deco


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        for mod in _BUILTIN_MODULES:
            importlib.import_module(mod)
        _builtins_loaded = True


def known_verifiers() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_verifier(name: str) -> Verifier:
    """The verifier registered as `name`; a miss lists the known names."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown verifier {name!r}; known verifiers: {', '.join(sorted(_REGISTRY))}") from None


def check_reference(verifier: str, reference: Any) -> str | None:
    """Why `verifier` cannot score against `reference`, or None (also for a verifier
    without a registered check). An unknown verifier is a KeyError listing the known ones."""
    get_verifier(verifier)
    check = _REFERENCE_CHECKS.get(verifier)
    return None if check is None else check(reference)
