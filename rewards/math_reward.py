"""`math` verifier: extract the final answer, compare it with math-verify.

Extraction rules, first that fires wins (recorded in `info["rule"]`):
  1. the LAST `\\boxed{...}` (or `\\fbox{...}`), braces matched;
  2. the last "the answer is X" / "final answer: X" (X up to the end of its line);
  3. the last number in the text (`1,234`, `-0.5`, `3/4`).
Only the extracted answer is compared, so a right value that appears only in the
reasoning while the boxed answer is wrong scores 0.

Comparison: `math_verify.parse` + `verify` (fractions vs decimals, LaTeX, sets,
symbolic expressions). Their built-in timeout uses `signal.alarm`, which fails off the
main thread, so it is switched off here (`parsing_timeout=None, timeout_seconds=None`);
time is bounded by `score_batch`, which runs verifiers in worker processes it can kill.
When math-verify can parse neither side (plain words such as "Paris"), the answers are
compared as normalised strings instead (`info["compare"] = "string"`).
An extracted answer longer than `max(MAX_ANSWER_CHARS, 2 * len(gold))` or nested deeper
than `MAX_ANSWER_DEPTH` brackets scores 0 without reaching sympy: a `\boxed{}` holding
2,000 nested `\frac{1}{` or 50k nested braces otherwise runs until the pool's per-item
timeout kills the worker, which a policy that learns to emit them would pay every step.
Short answers whose evaluation would explode (`10^{10^{10}}`, `(10^{10})!`,
`\\binom{10^9}{10^6}`, `(x+1)^{100000}`) score 0 the same way, with the reason
(`rewards.math_cost.explosion`), unless the reference itself is as large.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from rewards.math_cost import explosion
from rewards.registry import RewardResult, register, register_reference_check

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS_RE = re.compile(r"(?:(?:the\s+)?(?:final\s+)?answer\s+is|final\s+answer\s*:)\s*:?\s*", re.IGNORECASE)
_BRACE_RE = re.compile(r"[{}]")
_NUMBER_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")


MAX_ANSWER_CHARS = 256
MAX_ANSWER_DEPTH = 50


def _nesting_depth(text: str) -> int:
    """Deepest nesting of (), [] and {} in `text` (unbalanced closers ignored)."""
    depth = deepest = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}" and depth:
            depth -= 1
    return deepest


def _too_complex(answer: str, gold: str) -> str | None:
    """Why `answer` is not worth handing to math-verify/sympy, or None."""
    if len(answer) > max(MAX_ANSWER_CHARS, 2 * len(gold)):
        return f"extracted answer too long ({len(answer)} chars)"
    depth = _nesting_depth(answer)
    if depth > max(MAX_ANSWER_DEPTH, _nesting_depth(gold)):
        return f"extracted answer nested too deeply (depth {depth})"
    exploding = explosion(answer)
    if exploding and explosion(gold) is None:  # a reference that is itself huge is trusted
        return f"extracted answer refused: {exploding}"
    return None


def _brace_partners(text: str) -> dict[int, int]:
    """{index of a `{`: index of the `}` closing it} for every balanced pair, in one pass."""
    partners, stack = {}, []
    for m in _BRACE_RE.finditer(text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            partners[stack.pop()] = m.start()
    return partners


def extract_boxed(text: str) -> str | None:
    """Content of the last balanced `\\boxed{...}`.

    Linear: every brace is matched once (`_brace_partners`), where scanning forward from
    each `\\boxed{` was quadratic on many unclosed ones (40k chars: 17 s). A `}` with no
    open brace before it is skipped, as the forward scan from a later `{` never saw it."""
    boxes = list(_BOXED_RE.finditer(text))
    if not boxes:
        return None
    partners = _brace_partners(text)
    for m in reversed(boxes):
        close = partners.get(m.end() - 1)
        if close is not None:
            return text[m.end() : close].strip()
    return None


def extract_answer(text: str) -> tuple[str | None, str]:
    """(answer, rule) with rule in {"boxed", "answer_is", "last_number", "none"}."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed, "boxed"
    matches = list(_ANSWER_IS_RE.finditer(text))
    if matches:
        tail = text[matches[-1].end() :].split("\n", 1)[0].strip()
        tail = tail.strip().strip("$").strip().rstrip(".").strip().strip("$").strip()
        if tail:
            return tail, "answer_is"
    numbers = _NUMBER_RE.findall(text)
    if numbers:
        return numbers[-1].replace(",", "").replace(" ", ""), "last_number"
    return None, "none"


def _parse(text: str) -> list:
    from math_verify import parse

    candidates = [text] if ("$" in text or "\\boxed" in text) else [f"${text}$", text]
    for cand in candidates:
        parsed = parse(cand, parsing_timeout=None)
        if parsed:
            return parsed
    return []


_INT_RE = re.compile(r"[-+]?\d{1,30}")


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().strip("$").strip().rstrip(".")).lower()


def answers_match(gold: str, answer: str) -> tuple[bool, str]:
    """(equal, how): math-verify equivalence, or normalised-string equality as fallback."""
    from math_verify import verify

    # Fast paths that cannot disagree with math-verify: two plain integers are equal exactly
    # when their values are, and identical normalised strings are the same expression
    # (parsed alike, or both unparsed and compared as strings below). They skip a LaTeX
    # parse that costs ~5 ms per answer (most of a tiny GRPO step's scoring).
    g, a = _normalise(gold), _normalise(answer)
    if _INT_RE.fullmatch(g) and _INT_RE.fullmatch(a):
        return int(g) == int(a), "integer"
    if g == a:
        return True, "string"
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold_parsed, answer_parsed = _parse(gold), _parse(answer)
    if gold_parsed and answer_parsed:
        if verify(gold_parsed, answer_parsed, timeout_seconds=None):
            return True, "math_verify"
    if not gold_parsed or not answer_parsed:
        return _normalise(gold) == _normalise(answer), "string"
    return False, "math_verify"


@register_reference_check("math")
def reference_problem(reference: Any) -> str | None:
    if not isinstance(reference, dict) or "answer" not in reference:
        return f"math reference must be a dict with an 'answer' field, got {reference!r:.200}"
    if reference["answer"] is None:  # e.g. a parquet / `datasets` row without one: Arrow pads it with null
        return "math reference field 'answer' is null"
    return None


@register("math")
def math_verifier(completion: str, reference: dict[str, Any], **_: Any) -> RewardResult:
    """1.0 when the extracted final answer equals `reference["answer"]`, else 0.0."""
    problem = reference_problem(reference)
    if problem:
        raise ValueError(problem)
    gold = str(reference["answer"]).strip()
    answer, rule = extract_answer(completion)
    info: dict[str, Any] = {"rule": rule, "extracted": answer, "gold": gold}
    if answer is None:
        info["reason"] = "no final answer found"
        return RewardResult(0.0, info)
    too_complex = _too_complex(answer, gold)
    if too_complex:
        info.update(reason=too_complex, extracted=answer[:200])
        return RewardResult(0.0, info)
    equal, how = answers_match(gold, answer)
    info["compare"] = how
    if not equal:
        info["reason"] = "answer differs from reference"
    return RewardResult(1.0 if equal else 0.0, info)
