"""Verifiers (math, code, instruction following, tool calls, format) and batch scoring.

Importing `rewards` is cheap: the names below are resolved lazily, and no verifier
imports torch. See docs/CONTRACTS.md ("Rewards") for the shared signature.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "RewardResult": "rewards.registry",
    "register": "rewards.registry",
    "get_verifier": "rewards.registry",
    "known_verifiers": "rewards.registry",
    "check_reference": "rewards.registry",
    "score_batch": "rewards.batch",
    "ScorerPool": "rewards.batch",
    "raise_if_all_verifier_errors": "rewards.batch",
    "parse_tool_calls": "rewards.tool_calls",
    "ToolCall": "rewards.tool_calls",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rewards' has no attribute {name!r}")
