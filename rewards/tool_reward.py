"""`tool` verifier: tool calls (parsed, schema-checked, compared) and the final answer.

Reference: `{"calls": [{"name", "arguments"}], "answer": ..., "tools": [schemas]}`
(`answer` and `tools` optional). The completion is a whole episode: assistant text,
`<tool_call>` blocks, `<tool_response>` blocks, final answer text.
- calls score: produced calls are matched to expected calls in order (each expected
  call takes the first unused produced call with its name); a matched call earns the
  fraction of argument names in either call whose values agree, 0 if it violates the
  schema; the sum is divided by max(#expected, #produced), so missing and extra calls
  both cost. One wrong argument of two -> 0.5 for that call.
- answer score: the final text (after the last tool block) equals the reference after
  normalisation (case, whitespace, trailing period), or, for a numeric reference, the
  last number in it equals the reference (rel. tol. 1e-6).
Argument values compare as JSON values (`values_equal`): `true` is not `1` (nor `[true]`
`[1]`), two integers compare exactly at any size (an integer of a few hundred digits once
made `math.isclose` raise OverflowError, and a batch of such calls stopped the stage),
other numbers within rel. tol. 1e-9.
- score = calls_weight * calls + (1 - calls_weight) * answer, calls_weight = 0.5;
  with no `answer` in the reference, score = calls.
Malformed markup scores 0 with the parser's reason; nothing raises on any completion.
"""

from __future__ import annotations

import math
import re
from typing import Any

from rewards.registry import RewardResult, register, register_reference_check
from rewards.tool_calls import MAX_VALUE_DEPTH, ToolCall, final_answer, try_parse_tool_calls

_JSON_TYPES = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


def schema_errors(call: ToolCall, tools: list[dict] | None) -> list[str]:
    """Why `call` violates its tool's schema (unknown tool, missing/unknown args, types, enum)."""
    if not tools:
        return []
    by_name = {t.get("function", t)["name"]: t.get("function", t) for t in tools}
    if call.name not in by_name:
        return [f"unknown tool {call.name!r}"]
    params = by_name[call.name].get("parameters") or {}
    props = params.get("properties") or {}
    errors = [f"{call.name}: missing required argument {r!r}" for r in params.get("required", []) if r not in call.arguments]
    for arg, value in call.arguments.items():
        spec = props.get(arg)
        if spec is None:
            if props and params.get("additionalProperties") is not True:
                errors.append(f"{call.name}: unknown argument {arg!r}")
            continue
        types = spec.get("type")
        types = [types] if isinstance(types, str) else (types or [])
        if types and not any(_JSON_TYPES.get(t, lambda v: True)(value) for t in types):
            errors.append(f"{call.name}.{arg}: expected {'/'.join(types)}, got {type(value).__name__}")
        if "enum" in spec and not any(values_equal(value, e) for e in spec["enum"]):
            errors.append(f"{call.name}.{arg}: {value!r} not in {spec['enum']}")
    return errors


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numbers_equal(a: int | float, b: int | float) -> bool:
    """Exact for two ints (any size); floats within rel 1e-9. An int too large for a float
    (a few hundred digits) compares exactly: `math.isclose` would raise OverflowError."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    except OverflowError:
        return a == b  # int vs float comparison is exact in Python and never overflows


def values_equal(a: Any, b: Any, depth: int = 0) -> bool:
    """JSON values equal as JSON types: a boolean never equals a number (`true` vs `1`),
    numbers compare with `_numbers_equal`, lists and objects element-wise (recursively,
    so `[true]` is not `[1]` either). Never raises."""
    if depth > 2 * MAX_VALUE_DEPTH:
        return False
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if _is_number(a) and _is_number(b):
        return _numbers_equal(a, b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(values_equal(x, y, depth + 1) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(values_equal(a[k], b[k], depth + 1) for k in a)
    if type(a) is not type(b) and not (_is_number(a) and _is_number(b)):
        return False
    return a == b


def call_credit(expected: dict, produced: ToolCall) -> float:
    keys = set(expected.get("arguments", {})) | set(produced.arguments)
    if not keys:
        return 1.0
    exp_args = expected.get("arguments", {})
    good = sum(1 for k in keys if k in exp_args and k in produced.arguments and values_equal(exp_args[k], produced.arguments[k]))
    return good / len(keys)


def score_calls(expected: list[dict], produced: list[ToolCall], tools: list[dict] | None) -> tuple[float, list[str]]:
    notes, used, total = [], set(), 0.0
    for e in expected:
        j = next((j for j, p in enumerate(produced) if j not in used and p.name == e["name"]), None)
        if j is None:
            notes.append(f"missing call {e['name']!r}")
            continue
        used.add(j)
        errors = schema_errors(produced[j], tools)
        credit = 0.0 if errors else call_credit(e, produced[j])
        notes += errors or ([] if credit == 1.0 else [f"{e['name']}: arguments differ ({credit:.2f} agree)"])
        total += credit
    notes += [f"unexpected call {p.name!r}" for j, p in enumerate(produced) if j not in used]
    denom = max(len(expected), len(produced))
    return (total / denom if denom else 1.0), notes


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", str(text).strip().rstrip(".").strip()).lower()


def answer_matches(reference: Any, text: str) -> bool:
    if _norm(reference) == _norm(text):
        return True
    try:
        ref = float(str(reference).replace(",", ""))
    except ValueError:
        return False
    nums = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    return bool(nums) and math.isclose(float(nums[-1]), ref, rel_tol=1e-6, abs_tol=1e-9)


@register_reference_check("tool")
def reference_problem(reference: Any) -> str | None:
    if not isinstance(reference, dict) or not isinstance(reference.get("calls"), list):
        return f"tool reference needs a 'calls' list, got {reference!r:.200}"
    for j, call in enumerate(reference["calls"]):
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) \
                or not isinstance(call.get("arguments", {}), dict):
            return f"tool reference calls[{j}] must be {{name: str, arguments: object}}, got {call!r:.200}"
    tools = reference.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        return f"tool reference 'tools' must be a list of objects, got {tools!r:.200}"
    return None


@register("tool")
def tool_verifier(completion: str, reference: dict[str, Any], calls_weight: float = 0.5, **_: Any) -> RewardResult:
    problem = reference_problem(reference)
    if problem:
        raise ValueError(problem)
    tools = reference.get("tools")
    calls, error = try_parse_tool_calls(completion, tools)
    if error:
        return RewardResult(0.0, {"reason": f"malformed tool call: {error}"})
    calls_score, notes = score_calls(reference["calls"], calls, tools)
    info: dict[str, Any] = {"calls": [{"name": c.name, "arguments": c.arguments} for c in calls], "calls_score": calls_score}
    score = calls_score
    if reference.get("answer") is not None:
        answer = final_answer(completion)
        ok = answer_matches(reference["answer"], answer)
        info.update(final_answer=answer, answer_correct=ok)
        notes += [] if ok else ["final answer differs from reference"]
        score = calls_weight * calls_score + (1.0 - calls_weight) * float(ok)
    if notes:
        info["reason"] = "; ".join(notes)
    return RewardResult(score, info)
