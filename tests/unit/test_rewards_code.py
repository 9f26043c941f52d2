"""The code verifier: extraction, partial credit, early exits, setup; plus score_batch plumbing."""

import json
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
    with pytest.raises(KeyError, match="unknown verifier .*; known: "):
        score_batch("cod", ["x"], [{}])
    with pytest.raises(ValueError, match="2 completions but 1 references"):
        score_batch("math", ["1", "2"], [{"answer": "1"}])


def test_score_batch_timeout_scores_item_zero_and_batch_goes_on(tmp_path, monkeypatch):
    # A math item whose verification hangs cannot be built reliably, so use a code item whose
    # sandbox wall limit exceeds the pool's per-item timeout: the pool must kill that worker.
    # The workers' directories go under a private TMPDIR (other processes share /tmp).
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    res = score_batch("code", ["import time\ntime.sleep(30)", "def sq(x): return x*x"], [REF, REF],
                      num_workers=2, timeout_s=1.5, wall_s=20.0)
    left = [n for n in os.listdir(tmp_path) if n.startswith("polymath-sbx")]
    assert not left, f"the killed worker's sandbox dir was left behind: {left}"
    assert res[0].score == 0.0 and "timeout: item took longer than 1.5s" in res[0].info["reason"]
    assert res[1].score == 1.0


# ---- verdicts decided outside the sandbox (rewards.code_tests) ----

from rewards import code_tests  # noqa: E402
from rewards.code_reward import reference_problem  # noqa: E402

_ENC: dict = {}
exec(code_tests.ENCODER_SOURCE, _ENC)


def _roundtrip(value):
    return code_tests.decode(_ENC["_encode"](value))


@pytest.mark.parametrize("test, calls", [
    ("assert f(2) == 4", ["f(2)"]),
    ("assert f(-3) == -12, 'msg'", ["f(-3)"]),
    ("assert abs(f(1) - 3.14) < 1e-6", ["f(1)"]),
    ("assert math.isclose(f(1), 2.5, rel_tol=1e-3)", ["f(1)"]),
    ("assert set(f(x)) == {1, 2}", ["f(x)"]),
    ("assert sorted(f([3, 1])) == [1, 3] and f([]) == []", ["f([3, 1])", "f([])"]),
    ("assert f(2) == [1] * 3", ["f(2)"]),
    ("assert f(1) == float('inf')", ["f(1)"]),
    ("assert f(0)[0] == 5", ["f(0)[0]"]),
    ("assert f(2) == K", ["f(2)", "K"]),
])
def test_plans_send_only_the_calls_to_the_child(test, calls):
    assert code_tests.parse_test(test).calls == calls


def test_non_assert_tests_are_rejected_up_front():
    for bad in ("x = f(1)", "assert f(1) == 1\nassert f(2) == 2", "f(1) == 1", "assert (", ""):
        with pytest.raises(ValueError, match="assert|parse"):
            code_tests.parse_test(bad)
    assert "assert" in reference_problem({"tests": ["print(f(1))"]})


HONEST_CASES = [
    ("def f(x): return x * 2", ["assert f(2) == 4", "assert f(3) == 7", "assert f(-1) != -2"]),
    ("def f(x): return [x, x]", ["assert f(1) == [1, 1]", "assert f(1) == (1, 1)", "assert 1 in f(1)"]),
    ("def f(x): return {x: (x, 'a')}", ["assert f(1) == {1: (1, 'a')}", "assert f(2)[2][1] == 'a'"]),
    ("def f(x): return {x, x + 1}", ["assert f(1) == {1, 2}", "assert sorted(f(1)) == [1, 2]", "assert len(f(3)) == 2"]),
    ("def f(x): return x / 3", ["assert abs(f(1) - 0.3333) < 1e-3", "assert math.isclose(f(3), 1.0)",
                                "assert f(1) == 1/3", "assert 0 < f(1) < 1 < f(6)"]),
    ("def f(x): return None", ["assert f(1) is None", "assert f(1) is not None", "assert not f(1)"]),
    ("def f(x): return x > 0", ["assert f(1)", "assert f(1) == True", "assert f(-1) is False", "assert f(1) == 1"]),
    ("def f(x): return 'é' * x", ["assert f(2) == 'éé'", "assert f(0) == ''", "assert f(1).upper() == 'É'"]),
    ("def f(x): return float('nan') if x else 1e308 * 10", ["assert f(0) == float('inf')", "assert f(1) != f(1)"]),
    ("def f(x): return 10 ** x", ["assert f(50) == 10 ** 50", "assert f(2) == 100 and f(3) == 1000"]),
    ("def f(x): return b'ab' * x", ["assert f(1) == b'ab'", "assert f(2) == b'abab'"]),
    ("def f(x): return frozenset([x])", ["assert f(1) == {1}", "assert f(1) == frozenset({1})"]),
    ("def f(x): return 1 + 2j", ["assert f(0) == complex(1, 2)", "assert f(0).imag == 2"]),
]


@pytest.mark.parametrize("program, tests", HONEST_CASES)
def test_parent_verdicts_agree_with_running_the_test_in_python(program, tests):
    import math

    for test in tests:
        g = {"math": math}
        exec(program, g)
        try:
            exec(test, g)
            expected = True
        except AssertionError:
            expected = False
        plan = code_tests.parse_test(test)
        replies = [_roundtrip(eval(c, g)) for c in plan.calls]
        assert code_tests.verdict(plan, replies)[0] == expected, test


def test_objects_of_the_program_never_count_as_equal():
    class Liar:
        def __eq__(self, other):
            return True

        def __bool__(self):
            return True

    class Int(int):
        def __eq__(self, other):
            return True

    plan = code_tests.parse_test("assert f(1) == 4")
    for cheat in (Liar(), Int(0), [Liar()], {"k": Int(3)}):
        assert code_tests.verdict(plan, [_roundtrip(cheat)])[0] is False
    truth = code_tests.parse_test("assert f(1)")
    ok, why = code_tests.verdict(truth, [_roundtrip(Liar())])
    assert not ok and "not a plain value" in why
    assert code_tests.verdict(code_tests.parse_test("assert f(1) is not None"), [_roundtrip(Liar())])[0]


def test_decode_rejects_malformed_and_hostile_replies():
    for bad in ('{"t": 1}', '{"zz": []}', '{"x": "zz"}', '{"d": [[[1], 2]]}', '{"s": [[1]]}', '{"f": "' + "9" * 50 + '"}',
                "[" * 50_000 + "]" * 50_000, '{"x": "ff"}', "nan-ish", '{"c": [1, 2]}'):
        with pytest.raises(ValueError):
            code_tests.decode(bad)
    deep = 1
    for _ in range(150):
        deep = [deep]
    with pytest.raises(ValueError):
        code_tests.decode(json.dumps(deep))


def test_child_failures_and_duplicates_fail_the_test_with_the_reason():
    plan = code_tests.parse_test("assert f(1) == 1")
    ok, why = code_tests.verdict(plan, [code_tests.failed("ZeroDivisionError: division by zero")])
    assert not ok and "ZeroDivisionError" in why
    assert code_tests.verdict(code_tests.parse_test("assert [0] * f(1) == []"), [10 ** 9])[0] is False  # too large


def test_unsafe_local_mode_runs_and_says_so():
    (res,) = score_batch("code", ["def sq(x): return x*x"], [REF], num_workers=1, sandbox="unsafe-local")
    assert res.score == 1.0 and res.info["sandbox"] == "unsafe-local"
    assert res.info["isolation"]["network"] == "unavailable"
    (bad,) = score_batch("code", ["def sq(x): return x*x"], [REF], num_workers=1, sandbox="none")
    assert bad.score == 0.0 and "sandbox" in bad.info["reason"]


def test_fails_closed_when_isolation_cannot_be_set_up(monkeypatch):
    """Where the probe fails, the verifier refuses to run programs (a verifier error), it
    does not quietly run them unisolated."""
    from rewards import sandbox, sandbox_isolation
    from rewards.code_reward import code_verifier

    monkeypatch.setattr(sandbox, "IN_WORKER", True)
    monkeypatch.setitem(sandbox_isolation._probe_cache, os.getpid(),
                        {"available": False, "error": "unshare: Operation not permitted"})
    with pytest.raises(sandbox_isolation.SandboxUnavailable, match="unsafe-local.*|Operation not permitted"):
        code_verifier("def sq(x): return x*x", REF)
    monkeypatch.setenv("POLYMATH_SANDBOX", "unsafe-local")
    assert code_verifier("def sq(x): return x*x", REF).score == 1.0


def test_config_sandbox_setting_reaches_the_workers_and_the_report(tmp_path):
    from rewards import ScorerPool
    from pipeline.report import write_report

    with ScorerPool(num_workers=1, sandbox="unsafe-local") as pool:
        (res,) = pool.score("code", ["def sq(x): return x*x"], [REF])
    assert res.score == 1.0 and res.info["sandbox"] == "unsafe-local"
    with pytest.raises(ValueError, match="sandbox must be one of"):
        ScorerPool(sandbox="off")
    (tmp_path / "config.yaml").write_text("experiment: x\nsandbox: unsafe-local\n")
    assert "Code sandbox: unsafe-local" in write_report(tmp_path).read_text()
    (tmp_path / "config.yaml").write_text("experiment: x\n")
    assert "unsafe-local" not in write_report(tmp_path).read_text()


def test_code_domain_scores_equal_running_its_tests_in_python():
    """The tiny experiment's code domain: the sandboxed, parent-judged score of its
    demonstrations and of corrupted ones equals the fraction of its asserts that pass
    when run directly in Python (its quality bars depend on these scores)."""
    from engine.domains import get_domain

    rows = get_domain("code").generate("eval", 6, seed=3)
    programs, refs, want = [], [], []
    for r in rows:
        demo = r["messages"][-1]["content"]
        for prog in (demo, demo.replace("+", "-", 1), demo.replace("x", "y", 1), demo.replace("return ", "return 1+")):
            ok = []
            for t in r["reference"]["tests"]:
                try:
                    h: dict = {}
                    exec(prog, h)
                    exec(t, h)
                    ok.append(True)
                except Exception:
                    ok.append(False)
            programs.append(prog)
            refs.append(r["reference"])
            want.append(sum(ok) / len(ok))
    got = [res.score for res in score_batch("code", programs, refs, num_workers=2)]
    assert got == pytest.approx(want)
    assert want[0] == 1.0 and 0.0 in want  # both ends are exercised


def test_stdin_stdout_cases_are_compared_outside_the_sandbox():
    ref = {"io": [{"stdin": "2 3\n", "stdout": "5\n"}, {"stdin": "10 -4\n", "stdout": "6"}, {"stdin": "1 1", "stdout": "2"}]}
    honest = "a, b = map(int, input().split())\nprint(a + b)   \n"
    almost = "a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)\n"
    forger = "import os\nos.write(3, b'ok')\nprint('5')\n"
    crash = "a, b = map(int, input().split())\nprint(a + b)\nraise ValueError('late')\n"
    exits = "import sys\na, b = map(int, input().split())\nprint(a + b)\nsys.exit(0)\n"
    syntax = "print(("
    res = score_batch("code", [honest, almost, forger, crash, exits, syntax], [ref] * 6, num_workers=2)
    assert [r.score for r in res] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0, 1.0, 0.0])
    assert "wrong output" in res[1].info["reason"] and "ValueError: late" in res[3].info["reason"]
    assert "does not compile" in res[5].info["reason"]
    assert "not both" in reference_problem({"tests": ["assert f(1)"], "io": []})
    assert "io[0]" in reference_problem({"io": [{"stdin": 1, "stdout": "x"}]})


def test_parent_evaluation_is_bounded_whatever_the_child_returns():
    import time

    cases = [("assert f(1) % 5 == 0", "%999999999d"), ("assert sum(f(1), []) == []", [[0]] * 100_000),
             ("assert f(1) * 10 ** 9 == []", [0]), ("assert 2 ** f(1) > 0", 10 ** 7)]
    t0 = time.monotonic()
    for test, value in cases:
        ok, why = code_tests.verdict(code_tests.parse_test(test), [_roundtrip(value)])
        assert not ok and why, test
    assert time.monotonic() - t0 < 5
