"""Rows in == rows out: every kind of bad input line or item gives one output row, in order.

`python -m rewards score` and `score_batch` once crashed the whole batch (invalid UTF-8,
JSON nested 100k deep, a tool parameter holding JSON 983 deep) or dropped malformed
lines. Now each bad row scores 0 with an `error` (the CLI) / a failure reason (the pool),
and a failure the model's output causes is a plain 0, never a "verifier error" (a whole
batch of those stops a GRPO or eval stage).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rewards import score_batch
from rewards.failures import BAD_INPUT, VERIFIER_ERROR, scoring_failure

ROOT = Path(__file__).resolve().parents[2]
DEEP = "[" * 100_000 + "]" * 100_000


def _line(completion, reference) -> bytes:
    return json.dumps({"completion": completion, "reference": reference}).encode()


def _deep_list(depth: int):
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


# (case, raw line, expected score, expects an `error` field)
MATH_LINES = [
    ("right_answer", _line(r"so \boxed{0.50}", {"answer": "1/2"}), 1.0, False),
    ("invalid_utf8", b'{"completion": "\xff\xfe\\boxed{4}", "reference": {"answer": "4"}}', 0.0, True),
    ("malformed_json", b'{"completion": "\\boxed{4}", "reference": {"answer": ', 0.0, True),
    ("json_nested_100k", DEEP.encode(), 0.0, True),
    ("json_object_nested_100k", ('{"a":' * 100_000 + "1" + "}" * 100_000).encode(), 0.0, True),
    ("top_level_list", b'["\\\\boxed{4}", {"answer": "4"}]', 0.0, True),
    ("completion_not_string", _line(4, {"answer": "4"}), 0.0, True),
    ("reference_missing", b'{"completion": "\\\\boxed{4}"}', 0.0, True),
    ("reference_unusable", _line(r"\boxed{4}", {"solution": "4"}), 0.0, True),
    ("reference_nested_150", _line(r"\boxed{4}", {"answer": "4", "extra": _deep_list(150)}), 0.0, True),
    ("integer_of_5000_digits", b'{"completion": "x", "reference": {"answer": ' + b"1" * 5000 + b"}}", 0.0, True),
    ("nul_and_bom", b"\xef\xbb\xbf" + _line(r"\boxed{4}", {"answer": "4"}), 0.0, True),
    ("wrong_answer", _line("the answer is 5", {"answer": "4"}), 0.0, False),
    ("lone_surrogate", b'{"completion": "\\ud800 \\\\boxed{4}", "reference": {"answer": "4"}}', 1.0, False),
    ("boxed_of_200k_unclosed", _line("\\boxed{" * 30_000, {"answer": "4"}), 0.0, False),
    ("right_answer_again", _line(r"\boxed{7}", {"answer": "7"}), 1.0, False),
]
IFEVAL_REF = {"instruction_id_list": ["detectable_format:json_format"], "kwargs": [{}]}
IFEVAL_LINES = [
    ("json_answer", _line('{"a": 1}', IFEVAL_REF), 1.0, False),
    ("json_answer_nested_100k", _line(DEEP, IFEVAL_REF), 0.0, False),  # the model's fault: a 0
    ("json_answer_nested_983", _line("[" * 983 + "]" * 983, IFEVAL_REF), 1.0, False),
    ("kwargs_of_wrong_type", _line("a b c", {"instruction_id_list": ["length_constraints:number_words"],
                                             "kwargs": [{"num_words": "five", "relation": "at least"}]}), 0.0, True),
    ("unknown_instruction", _line("a b c", {"instruction_id_list": ["no:such"], "kwargs": [{}]}), 0.0, True),
    ("not_json", b"{'completion': 'single quotes'}", 0.0, True),
]
CALL = '<tool_call><invoke name="add"><parameter name="a">{a}</parameter><parameter name="b">2</parameter></invoke></tool_call>'
TOOL_REF = {"calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}
TOOL_LINES = [
    ("right_call", _line(CALL.format(a=1), TOOL_REF), 1.0, False),
    ("parameter_json_983_deep", _line(CALL.format(a="[" * 983 + "]" * 983), TOOL_REF), 0.0, False),
    ("parameter_json_100k_deep", _line(CALL.format(a=DEEP), TOOL_REF), 0.0, False),
    ("parameter_deep_inside_a_string", _line(CALL.format(a='"' + "[" * 983 + '"'), TOOL_REF), 0.5, False),  # b right
    ("invalid_utf8", b"\x80" * 10, 0.0, True),
    ("right_call_again", _line(CALL.format(a=1), TOOL_REF), 1.0, False),
]


@pytest.mark.parametrize("verifier,cases", [("math", MATH_LINES), ("ifeval", IFEVAL_LINES), ("tool", TOOL_LINES)],
                         ids=["math", "ifeval", "tool"])
def test_cli_gives_one_row_per_line_in_order(verifier, cases, tmp_path, fault_log):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(b"\n".join(raw for _, raw, _, _ in cases) + b"\n\n")  # a trailing blank line is no row
    proc = subprocess.run([sys.executable, "-m", "rewards", "score", verifier, str(src), "-o", str(out),
                           "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(cases), [r.get("error") for r in rows]
    for n, ((case, _, score, error), row) in enumerate(zip(cases, rows), start=1):
        assert row["score"] == score, (case, row.get("info"), row.get("error"))
        assert ("error" in row) == error, (case, row.get("error"), row.get("info"))
        if error:
            assert row["info"]["reason"] == row["error"] and f"{src}:{n}: " in proc.stderr, (case, proc.stderr)
        if "line" in row:  # a line that is no row is located and shown, not echoed
            assert row["line"] == n and len(row["input"]) <= 200, case
        else:
            assert row["completion"] == json.loads(cases[n - 1][1])["completion"], case
        fault_log(f"rewards score {verifier}: {case}", "contained")
    errors = sum(e for *_, e in cases)
    assert f"scored {len(cases)} rows ({errors} with an error" in proc.stderr, proc.stderr[-500:]


def test_cli_unknown_verifier_is_a_usage_error(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(_line("x", {}) + b"\n")
    proc = subprocess.run([sys.executable, "-m", "rewards", "score", "maths", str(src)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown verifier 'maths'" in proc.stderr and "Traceback" not in proc.stderr


def test_score_batch_returns_one_result_per_item_whatever_it_holds(fault_log):
    """The Python API: items no worker could take are 0 with a "bad input" reason; a deep
    tool argument or a deep JSON answer (the model's output) is a plain 0; a reference the
    verifier trips on is a "verifier error"; the good items around them still score."""
    deep_ref = {"answer": "4", "x": _deep_list(5000)}
    items = [  # (verifier, completion, reference, score, failure prefix or None)
        ("math", r"\boxed{4}", {"answer": "4"}, 1.0, None),
        ("math", 4, {"answer": "4"}, 0.0, BAD_INPUT),
        ("math", r"\boxed{4}", deep_ref, 0.0, BAD_INPUT),
        ("math", r"\boxed{4}", {"answer": "4", "s": {1, 2}}, 0.0, BAD_INPUT),
        ("math", r"\boxed{4}", {"no_answer": "4"}, 0.0, VERIFIER_ERROR),
        ("math", "\\boxed{" * 30_000, {"answer": "4"}, 0.0, None),
        ("math", r"\boxed{4}", {"answer": "4"}, 1.0, None),
    ]
    results = score_batch("math", [c for _, c, *_ in items], [r for _, _, r, *_ in items], num_workers=2)
    assert len(results) == len(items)
    for k, ((_, _, _, score, failure), res) in enumerate(zip(items, results)):
        assert res.score == score, (k, res.info)
        got = scoring_failure(res.info)
        assert (got or "").startswith(failure or "") and (got is None) == (failure is None), (k, res.info)
    tool = score_batch("tool", [CALL.format(a="[" * 983 + "]" * 983), CALL.format(a=1)], [TOOL_REF] * 2, num_workers=1)
    assert [r.score for r in tool] == [0.0, 1.0] and scoring_failure(tool[0].info) is None, tool[0].info
    assert "nested deeper than 64" in tool[0].info["reason"], tool[0].info
    ifeval = score_batch("ifeval", [DEEP], [IFEVAL_REF], num_workers=1)[0]
    assert ifeval.score == 0.0 and scoring_failure(ifeval.info) is None, ifeval.info
    fault_log("score_batch: non-string, deep, unserialisable items", "contained")
