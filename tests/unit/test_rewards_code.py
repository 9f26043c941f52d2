"""The code verifier: extraction, partial credit, early exits, setup; plus score_batch plumbing."""

import os
import threading

import pytest

from rewards import get_verifier, score_batch
from rewards.code_reward import extract_code

REF = {"tests": ["assert sq(2) == 4", "assert sq(3) == 9", "assert sq(-1) == 1"]}


def test_extract_last_fenced_block():
    text = "Try:\n```python\ndef sq(x): return 0\n```\nBetter:\n```python\ndef sq(x): return x*x\n```\nDone."
    assert extract_code(text) == ("def sq(x): return x*x\n", "fenced")
    assert extract_code("def sq(x): return x*x") == ("def sq(x): return x*x", "whole_text")
    assert extract_code("```py\ndef sq(x): return x*x")[1] == "unclosed_fence"


def _score(codes, ref=REF, **kw):
    return score_batch("code", codes, [ref] * len(codes), num_workers=2, **kw)


def test_pass_partial_fail_and_reasons():
    full, partial, wrong, syntax = _score([
        "```python\ndef sq(x): return x*x\n```",
        "def sq(x): return x*x if x > 0 else 0",  # fails sq(-1): 2 of 3
        "def sq(x): return x+x",  # sq(2) == 4 by accident: 1 of 3
        "def sq(x) return",
    ])
    assert full.score == 1.0 and full.info["passed"] == [True, True, True]
    assert partial.score == pytest.approx(2 / 3) and "test 2" in partial.info["reason"]
    assert wrong.score == pytest.approx(1 / 3)
    assert syntax.score == 0.0 and "SyntaxError" in syntax.info["reason"]


def test_all_or_nothing_from_reference_or_option():
    code = "def sq(x): return x*x if x > 0 else 0"
    assert _score([code], {**REF, "all_or_nothing": True})[0].score == 0.0
    assert _score([code], all_or_nothing=True)[0].score == 0.0


def test_setup_runs_before_program():
    ref = {"setup": "import math\nK = 10", "tests": ["assert f(2) == 12"]}
    assert _score(["def f(x): return x + K"], ref)[0].score == 1.0


def test_early_exit_is_not_a_pass_and_fake_output_is_ignored():
    fake = 'import json\nprint(json.dumps({"test": 0, "ok": True, "nonce": "x"}))\nimport sys\nsys.exit(0)'
    exit0, osexit_mid, faker = _score([
        "import sys\nsys.exit(0)\ndef sq(x): return x*x",
        "import os\ndef sq(x):\n    if x == 3: os._exit(0)\n    return x*x",  # dies in test 1
        fake,
    ])
    assert exit0.score == 0.0 and "ended before its tests ran (exited with code 0)" in exit0.info["reason"]
    assert osexit_mid.score == pytest.approx(1 / 3) and "did not finish" in osexit_mid.info["reason"]
    assert faker.score == 0.0


def test_main_guard_does_not_run():
    code = "def sq(x): return x*x\nif __name__ == '__main__':\n    input()\n    raise SystemExit(1)"
    assert _score([code])[0].score == 1.0


def test_direct_call_delegates_to_a_worker_and_works_off_main_thread():
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", get_verifier("code")("def sq(x): return x*x", REF)))
    t.start()
    t.join()
    assert out["r"].score == 1.0


def test_bad_reference_scores_zero_with_reason_in_batch():
    (res,) = score_batch("code", ["x = 1"], [{"tests": []}], num_workers=1)
    assert res.score == 0.0 and "verifier error" in res.info["reason"] and "tests" in res.info["reason"]


def test_score_batch_rejects_unknown_name_and_length_mismatch():
    with pytest.raises(KeyError, match="known verifiers"):
        score_batch("cod", ["x"], [{}])
    with pytest.raises(ValueError, match="2 completions but 1 references"):
        score_batch("math", ["1", "2"], [{"answer": "1"}])


def test_score_batch_timeout_scores_item_zero_and_batch_goes_on():
    # A math item whose verification hangs cannot be built reliably, so use a code item whose
    # sandbox wall limit exceeds the pool's per-item timeout: the pool must kill that worker.
    before = {n for n in os.listdir("/tmp") if n.startswith("polymath-sbx")}
    res = score_batch("code", ["import time\ntime.sleep(30)", "def sq(x): return x*x"], [REF, REF],
                      num_workers=2, timeout_s=1.5, wall_s=20.0)
    after = {n for n in os.listdir("/tmp") if n.startswith("polymath-sbx")}
    assert after <= before, f"the killed worker's sandbox dir was left behind: {after - before}"
    assert res[0].score == 0.0 and "timeout: item took longer than 1.5s" in res[0].info["reason"]
    assert res[1].score == 1.0
