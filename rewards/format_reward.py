"""`format` verifier: a well-formed `<think>...</think>` then a non-empty answer.

Rules (each failure named in `info["reason"]`): exactly one `<think>` and one `</think>`,
in that order, with the think block opening the completion (leading whitespace allowed);
a non-empty answer after `</think>`; if the answer uses `<answer>` tags, exactly one
well-ordered pair with non-empty content and nothing but whitespace after it.
Options: `require_think=False` accepts a completion with no think block at all;
`require_answer_tags=True` demands the `<answer>` pair. Score is 1.0 or 0.0; domains add
it to their reward with a weight.
"""

from __future__ import annotations

import re
from typing import Any

from rewards.registry import RewardResult, register


def _check_think(text: str, require_think: bool) -> tuple[str | None, str]:
    """(failure reason or None, the text after the think block)."""
    opens, closes = text.count("<think>"), text.count("</think>")
    if opens == 0 and closes == 0:
        return ("missing <think> block" if require_think else None), text
    if opens != 1 or closes != 1:
        return f"expected one <think> and one </think>, found {opens} and {closes}", text
    if not text.lstrip().startswith("<think>"):
        return "text before <think>", text
    start, end = text.index("<think>"), text.index("</think>")
    if end < start:
        return "</think> before <think>", text
    return None, text[end + len("</think>") :]


def _check_answer(rest: str, require_tags: bool) -> str | None:
    opens, closes = rest.count("<answer>"), rest.count("</answer>")
    if opens == 0 and closes == 0:
        if require_tags:
            return "missing <answer>...</answer>"
        return None if rest.strip() else "empty answer after </think>"
    m = re.fullmatch(r"\s*<answer>(.*?)</answer>\s*", rest, flags=re.DOTALL)
    if opens != 1 or closes != 1 or m is None:
        return "malformed <answer> tags (need exactly one pair and nothing around it)"
    return None if m.group(1).strip() else "empty <answer>"


@register("format")
def format_verifier(
    completion: str, reference: dict[str, Any] | None = None, require_think: bool = True,
    require_answer_tags: bool = False, **_: Any,
) -> RewardResult:
    reason, rest = _check_think(completion, require_think)
    if reason is None:
        reason = _check_answer(rest, require_answer_tags)
    info = {"reason": reason} if reason else {}
    return RewardResult(0.0 if reason else 1.0, info)
