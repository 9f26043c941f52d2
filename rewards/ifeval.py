"""`ifeval` verifier: IFEval instruction following, strict and loose as IFEval defines them.

Reference: IFEval's own fields, `{"instruction_id_list": [...], "kwargs": [{...}, ...]}`;
`None`-valued kwargs (as in the public HF rows) are dropped, so rows score unconverted.
strict: an instruction is followed when the response is non-empty and its checker passes.
loose: followed when any of 8 variants passes: the response, it without its first line,
without its last line, without both, and each of those four with every `*` removed.
`score` = the strict instruction-level fraction (partial credit is a denser RL signal;
`mode=` picks another of strict/loose x instruction/prompt). `info` reports all four.
Checkers and their departures from IFEval: rewards/ifeval_checks.py.
"""

from __future__ import annotations

from typing import Any

from rewards.ifeval_checks import CHECKERS
from rewards.registry import RewardResult, register, register_reference_check

MODES = ("strict_instruction", "strict_prompt", "loose_instruction", "loose_prompt")


def loose_variants(response: str) -> list[str]:
    lines = response.split("\n")
    cut = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    base = [response] + cut
    return base + [r.replace("*", "") for r in base]


def check_instruction(instruction_id: str, kwargs: dict[str, Any], response: str) -> bool:
    """One checker on one text; a bad id or bad kwargs is a ValueError naming them."""
    try:
        fn = CHECKERS.get(instruction_id)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    args = {k: v for k, v in (kwargs or {}).items() if v is not None}
    try:
        return bool(response.strip()) and bool(fn(response, **args))
    except TypeError as exc:
        raise ValueError(f"ifeval instruction {instruction_id!r}: bad kwargs {args!r}: {exc}") from None


@register_reference_check("ifeval")
def reference_problem(reference: Any) -> str | None:
    ids = reference.get("instruction_id_list") if isinstance(reference, dict) else None
    if not isinstance(ids, list) or not ids:
        return f"ifeval reference needs a non-empty 'instruction_id_list', got {reference!r:.200}"
    unknown = [i for i in ids if not isinstance(i, str) or i not in CHECKERS]
    if unknown:
        return f"unknown ifeval instruction {unknown[0]!r:.100}; known: {', '.join(CHECKERS.names())}"
    kwargs = reference.get("kwargs") or [{} for _ in ids]
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        return f"ifeval reference: {len(ids)} instruction ids but kwargs is {kwargs!r:.200}"
    if not all(kw is None or isinstance(kw, dict) for kw in kwargs):
        return "ifeval reference: each kwargs entry must be an object or null"
    return None


@register("ifeval")
def ifeval_verifier(completion: str, reference: dict[str, Any], mode: str = "strict_instruction", **_: Any) -> RewardResult:
    problem = reference_problem(reference)
    if problem:
        raise ValueError(problem)
    ids = reference["instruction_id_list"]
    kwargs = reference.get("kwargs") or [{} for _ in ids]
    if mode not in MODES:
        raise ValueError(f"ifeval mode must be one of {MODES}, got {mode!r}")
    variants = loose_variants(completion)
    strict = [check_instruction(i, kw, completion) for i, kw in zip(ids, kwargs)]
    loose = [any(check_instruction(i, kw, v) for v in variants) for i, kw in zip(ids, kwargs)]
    metrics = {
        "strict_instruction": sum(strict) / len(ids),
        "strict_prompt": float(all(strict)),
        "loose_instruction": sum(loose) / len(ids),
        "loose_prompt": float(all(loose)),
    }
    info: dict[str, Any] = {"followed_strict": dict(zip(ids, strict)), "followed_loose": dict(zip(ids, loose)), **metrics}
    failed = [i for i, ok in zip(ids, strict) if not ok]
    if failed:
        info["reason"] = "not followed (strict): " + ", ".join(failed)
    return RewardResult(metrics[mode], info)
