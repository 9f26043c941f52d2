"""Rewards, third round (issue 39): one test per class of defect, written from the classes.

1. A verifier error is its row's problem: tool calls with integers of hundreds to
   thousands of digits score as verdicts (never `verifier error`), a batch of them keeps
   the stage running, and errors stop a stage only at the configured rate.
2. Bounded cost: linear code-fence extraction; math answers whose evaluation explodes
   are refused before sympy; each verifier has its own time limit.
3. The expected side never runs with the program: wrong programs against expected
   values of every expression kind score 0 (also when they rewrite what the expression
   would use), honest ones 1; `range`, sets, tuples and dicts compare as in Python.
4. Isolation per item: host data files, UNIX sockets and FIFOs are not reachable; a
   kernel key one item adds is gone for the next; a whole program's memory is bounded;
   nothing is left on the host after the pool closes (also before a worker said hello).
5. Exact comparisons: a JSON boolean is not a number in tool arguments.

Cost: about 40-60 s on 2 idle cores (some 60 sandboxed programs in 3 pools).
"""

from __future__ import annotations

import glob
import os
import pathlib
import shutil
import socket
import sys
import time

import pytest

from rewards import ScorerPool, score_batch
from rewards.batch import ITEM_TIMEOUT_S, count_failures
from rewards.failures import VERIFIER_ERROR
from rewards.sandbox_isolation import probe

ROOT = pathlib.Path(__file__).resolve().parents[2]
needs_sandbox = pytest.mark.skipif(not probe()["available"], reason="code sandbox unavailable here")


# ---- 1. a verifier error is its row's problem ----

TOOLS = [{"type": "function", "function": {"name": "pay", "parameters": {
    "type": "object", "properties": {"amount": {"type": "integer"}, "rate": {"type": "number"},
                                     "urgent": {"type": "boolean"}},
    "required": ["amount"]}}}]


def _call(amount: str, rate: str = "0.5", urgent: str = "true") -> str:
    return (f'<tool_call><invoke name="pay"><parameter name="amount">{amount}</parameter>'
            f'<parameter name="rate">{rate}</parameter><parameter name="urgent">{urgent}</parameter>'
            "</invoke></tool_call>")


def test_a_batch_of_overflowing_tool_calls_keeps_the_stage_running(fault_log):
    from engine.episode import verified_results

    ref = {"calls": [{"name": "pay", "arguments": {"amount": 7, "rate": 0.5, "urgent": True}}], "tools": TOOLS}
    huge = [("9" * n) for n in (309, 400, 1000, 4000, 4300)] + ["-" + "9" * 999]
    texts = [_call(h) for h in huge] + [_call("7", rate=h) for h in huge] + [_call("7", rate="1e999")]
    with ScorerPool(num_workers=1) as pool:
        results = verified_results(pool, "tool", texts, [ref] * len(texts), "GRPO step 0")  # must not raise
        exact = 10 ** 400 + 1
        (big,) = pool.score("tool", [_call(str(exact))],
                            [{"calls": [{"name": "pay", "arguments": {"amount": exact, "rate": 0.5, "urgent": True}}]}])
    for text, r in zip(texts, results):
        assert not r.info.get("reason", "").startswith(VERIFIER_ERROR), (text[:80], r.info)
        assert r.score < 1.0 and "arguments differ" in r.info["reason"], r.info
        fault_log("tool argument of hundreds of digits", "contained")
    assert count_failures(results)["verifier_errors"] == 0
    assert big.score == 1.0, big.info  # a huge integer equal to the reference's compares exactly


def test_verifier_errors_stop_a_stage_only_at_the_configured_rate(fault_log):
    from engine.episode import verified_results

    good = {"calls": [{"name": "pay", "arguments": {"amount": 7}}]}
    broken = {"calls": [{"name": "pay", "arguments": "not an object"}]}  # the verifier raises on it
    refs = [broken] * 3 + [good] * 5
    texts = [_call("7")] * 8
    with ScorerPool(num_workers=1) as pool:
        results = verified_results(pool, "tool", texts, refs, "GRPO step 1")  # 3 of 8: the rows' zeros
    assert count_failures(results)["verifier_errors"] == 3
    fault_log("3 of 8 verifier errors, default rate", "contained")
    with ScorerPool(num_workers=1, max_error_rate=0.25) as pool:
        with pytest.raises(RuntimeError, match="raised on 3 of 8 items"):
            verified_results(pool, "tool", texts, refs, "GRPO step 1")
    fault_log("3 of 8 verifier errors, rate 0.25", "detected")
    with pytest.raises(ValueError, match="max_error_rate"):
        ScorerPool(max_error_rate=0)


# ---- 2. bounded cost ----

def test_code_fence_extraction_is_linear():
    from rewards.code_reward import extract_code

    for text in ("```" + " " * 200_000, "```python" + " \t" * 100_000 + "x", ("```" + " " * 50) * 4000):
        start = time.perf_counter()
        extract_code(text)
        assert time.perf_counter() - start < 1.0  # quadratic backtracking took 156 s on the first


EXPLODING = ["10^{10^{10}}", "9^{9^{9}}", "(10^{10})!", "(x+1)^{100000}", "\\binom{10^9}{10^6}",
             "2^{2^{2^{2^{2^{2}}}}}", "10**10**10", "\\dfrac{10^{12}}{2}!", "(a+b)^{5000}"]


def test_math_answers_that_would_explode_are_refused_before_sympy(fault_log):
    texts = [f"\\boxed{{{a}}}" for a in EXPLODING] + ["\\boxed{2^{2024}}", "\\boxed{(x+1)^{2}}", "\\boxed{120}"]
    refs = [{"answer": "3"}] * len(EXPLODING) + [{"answer": "2^{2024}"}, {"answer": "x^2+2x+1"}, {"answer": "5!"}]
    start = time.perf_counter()
    results = score_batch("math", texts, refs, num_workers=1)
    elapsed = time.perf_counter() - start
    for a, r in zip(EXPLODING, results):
        assert r.score == 0.0 and "too costly" in r.info["reason"], (a, r.info)
        fault_log(f"math answer {a}", "contained")
    assert [r.score for r in results[len(EXPLODING):]] == [1.0, 1.0, 1.0]  # large but cheap answers still score
    assert elapsed < 30, elapsed  # each exploding answer held a worker for the full 30 s before


def test_each_verifier_has_its_own_time_limit():
    assert ITEM_TIMEOUT_S["math"] <= 10 < ITEM_TIMEOUT_S["code"]
    with ScorerPool(num_workers=1) as pool:
        pool.score("math", ["\\boxed{1}"], [{"answer": "1"}])
        assert pool._item_timeout_s == ITEM_TIMEOUT_S["math"]


# ---- 3. the expected side never runs with the program ----

# (test, honest program, wrong program): one per kind of expected-side expression
EXPECTED_KINDS = [
    ("assert f('abc') == 'abc'[::-1]", "def f(s):\n    return s[::-1]", "def f(s):\n    return s"),
    ("assert f('ab') == 'ab'.upper()", "def f(s):\n    return s.upper()", "def f(s):\n    return s"),
    ("assert f(4) == [x * x for x in range(4)]", "def f(n):\n    return [i * i for i in range(n)]",
     "def f(n):\n    return list(range(n))"),
    ("assert f(3) == list(range(3))", "def f(n):\n    return list(range(n))", "def f(n):\n    return range(n)"),
    ("assert f(3) == range(3)", "def f(n):\n    return range(n)", "def f(n):\n    return list(range(n))"),
    ("assert f(1) == dict(a=1, b=[2])", "def f(x):\n    return {'a': x, 'b': [2]}", "def f(x):\n    return {'a': x}"),
    ("assert f(2) == {k: v for k, v in zip('ab', (1, 2))}", "def f(x):\n    return {'a': 1, 'b': x}",
     "def f(x):\n    return {'a': 1, 'b': 1}"),
    ("assert f(2) == {1, 2}", "def f(x):\n    return {x, 1}", "def f(x):\n    return [1, x]"),
    ("assert f(2) == (1, 2)", "def f(x):\n    return (1, x)", "def f(x):\n    return [1, x]"),
    ("assert f(3) == tuple(sorted({3, 1, 2}))", "def f(n):\n    return tuple(range(1, n + 1))",
     "def f(n):\n    return (3, 2, 1)"),
    ("assert f(2) == f'{1 + 1}x'", "def f(n):\n    return str(n) + 'x'", "def f(n):\n    return 'x'"),
    ("assert f(10) == sum(i for i in range(10))", "def f(n):\n    return n * (n - 1) // 2", "def f(n):\n    return n"),
    ("assert f(3) == K", "def f(n):\n    return [1, 2, 3][:n]", "def f(n):\n    return [0]"),
]
SETUP = "K = [1, 2, 3]\n"

# wrong programs that rewrite what the expected side would use if it ran beside them
REWRITERS = [
    "import builtins\nbuiltins.range = lambda *a: ['x']\nbuiltins.list = lambda *a: ['x']\ndef f(n):\n    return ['x']",
    "import builtins\nbuiltins.sorted = lambda *a, **k: 'x'\nbuiltins.tuple = lambda *a: 'x'\ndef f(n):\n    return 'x'",
    "import builtins\nbuiltins.dict = lambda *a, **k: 0\nbuiltins.sum = lambda *a: 0\ndef f(*a):\n    return 0",
    "K = [0]\ndef f(n):\n    return [0]",  # rebinds the setup's name
    "import sys\nfor fr in [sys._getframe(i) for i in range(1, 3)]:\n    fr.f_globals['_encode'] = lambda *a: '0'\n"
    "def f(*a):\n    return 0",  # the harness's encoder
]


@needs_sandbox
def test_expected_sides_are_computed_without_the_program(fault_log):
    tests = [t for t, _, _ in EXPECTED_KINDS]
    refs, texts, want = [], [], []
    for test, honest, wrong in EXPECTED_KINDS:
        for program, score in ((honest, 1.0), (wrong, 0.0)):
            refs.append({"setup": SETUP, "tests": [test]})
            texts.append(program)
            want.append(score)
    for program in REWRITERS:
        refs.append({"setup": SETUP, "tests": tests})
        texts.append(program)
        want.append(0.0)
    results = score_batch("code", texts, refs, num_workers=1)
    for text, ref, r, w in zip(texts, refs, results, want):
        assert r.score == w, (ref["tests"], text, r.info.get("reason"))
        if w == 0.0:
            fault_log("wrong program against a computed expected value", "contained")


def test_the_child_never_receives_an_expected_expression():
    from rewards.code_reward import _plans

    plans = _plans(tuple(t for t, _, _ in EXPECTED_KINDS), SETUP)
    assert all(p.calls == [p.source.split(" == ")[0].split("assert ")[1]] for p in plans), [p.calls for p in plans]
    assert [e for p in plans for e in p.setup_exprs] == ["K"]


# ---- 4. isolation per item ----

@pytest.fixture
def host_secrets():
    """A world-readable answer-key file, a listening UNIX socket and a FIFO in a
    world-traversable directory of the repository (not under /tmp)."""
    d = ROOT / ".cache" / f"sbx-secrets-{os.getpid()}"
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o755)
    keys = d / "answers.jsonl"
    keys.write_text('{"tests": ["assert f(1) == 42"]}\n')
    os.chmod(keys, 0o644)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(d / "sock"))
    server.listen(1)
    os.chmod(d / "sock", 0o777)
    os.mkfifo(d / "fifo", 0o666)
    fixture = ROOT / "tests" / "fixtures" / "mbpp.jsonl"
    yield {"keys": str(keys), "sock": str(d / "sock"), "fifo": str(d / "fifo"), "fixture": str(fixture)}
    server.close()
    shutil.rmtree(d, ignore_errors=True)


SPY = """import os, socket
def probe(kind, path):
    try:
        if kind == "sock":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(1)
            s.connect(path)
            return "connected"
        if kind == "fifo":
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            return "opened"
        return open(path).read()[:40]
    except OSError as e:
        return "blocked"
def f():
    return [probe(k, p) for k, p in %r]
"""


@needs_sandbox
def test_host_files_sockets_and_fifos_are_not_reachable(host_secrets, fault_log):
    targets = [("file", host_secrets["keys"]), ("file", host_secrets["fixture"]), ("sock", host_secrets["sock"]),
               ("fifo", host_secrets["fifo"])]
    (r,) = score_batch("code", [SPY % targets], [{"tests": ["assert f() == ['blocked'] * 4"]}], num_workers=1)
    assert r.score == 1.0, (r.info.get("reason"), r.info.get("output_tail"))
    for kind, _ in targets:
        fault_log(f"host {kind} reached from the sandbox", "contained")


KEYS = """import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
ADD_KEY, REQUEST_KEY = {"x86_64": (248, 249), "aarch64": (217, 218)}[__import__("os").uname().machine]
def add(ring):
    return libc.syscall(ADD_KEY, b"user", b"polymath-leak-%d", b"secret", 6, ctypes.c_int(ring))
def find():
    return libc.syscall(REQUEST_KEY, b"user", b"polymath-leak-%d", None, 0) > 0
"""


@needs_sandbox
@pytest.mark.skipif(os.uname().machine not in ("x86_64", "aarch64"), reason="syscall numbers for x86_64/aarch64")
def test_kernel_keys_of_one_item_are_gone_for_the_next(fault_log):
    tag = os.getpid()
    adder = (KEYS % (tag, tag)) + "ids = [add(-4), add(-3), add(-5)]\ndef f():\n    return [i > 0 for i in ids]\n"
    finder = (KEYS % (tag, tag)) + "def f():\n    return find()\n"
    with ScorerPool(num_workers=1) as pool:
        added, found = pool.score("code", [adder, finder], [{"tests": ["assert f() == [True, True, True]"]},
                                                           {"tests": ["assert f() is False"]}])
    assert added.score == 1.0, added.info  # the keys were added (user, session, user-session keyrings) ...
    assert found.score == 1.0, found.info  # ... and the next item in the same worker cannot find them
    fault_log("kernel key left for the next item", "contained")


MEMORY_HOG = """import os, time
def hog(mb):
    kids = []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:
            try:
                b = bytearray(mb << 20)
                time.sleep(1.0)
                os._exit(0)
            except MemoryError:
                os._exit(3)
        kids.append(pid)
    return [os.waitstatus_to_exitcode(os.waitpid(k, 0)[1]) for k in kids]
STATUS = hog(%d)
def f():
    return STATUS
"""


@needs_sandbox
def test_a_whole_programs_memory_is_bounded(fault_log):
    limit = 256 << 20  # three processes of 150 MB each stay under RLIMIT_AS, not under the program's limit
    refs = [{"tests": ["assert f() == [0, 0, 0]"]}] * 2
    over, under = score_batch("code", [MEMORY_HOG % 150, MEMORY_HOG % 20], refs, num_workers=1,
                              memory_bytes=limit, wall_s=20, cpu_s=20)
    if "cgroup" not in over.info["isolation"].get("memory", ""):
        pytest.skip(f"no cgroup here: {over.info['isolation'].get('memory')}")
    assert under.score == 1.0, under.info
    assert over.score == 0.0, over.info  # at least one of the three was killed at the program's limit
    fault_log("three processes past the program's memory limit", "contained")


def _cgroups_of(pids: list[int]) -> list[str]:
    return [p for pid in pids for p in glob.glob(f"/sys/fs/cgroup/**/polymath-sbx-{pid}-*", recursive=True)]


@needs_sandbox
def test_nothing_is_left_on_the_host(tmp_path, monkeypatch, fault_log):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the pool's work dirs go here (tempfile reads TMPDIR)
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    with ScorerPool(num_workers=1) as pool:
        pool.score("code", ["def f():\n    return 1"], [{"tests": ["assert f() == 1"]}])
        pids = [w.proc.pid for w in pool._workers]
    assert os.listdir(tmp_path) == [] and _cgroups_of(pids) == []
    pool = ScorerPool(num_workers=1)
    pool._top_up(1)  # a worker starting ...
    pids = [w.proc.pid for w in pool._workers]
    pool.close()  # ... killed before it said hello
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)
    assert _cgroups_of(pids) == []
    fault_log("work dir of a worker killed before hello", "contained")


# ---- 5. exact comparisons ----

def test_a_json_boolean_is_not_a_number_in_tool_arguments():
    from rewards.tool_reward import tool_verifier

    ref = {"calls": [{"name": "pay", "arguments": {"amount": 7, "urgent": True}}], "tools": TOOLS}
    assert tool_verifier(_call("7", urgent="true").replace('<parameter name="rate">0.5</parameter>', ""),
                         ref).score == 1.0
    one = tool_verifier(_call("7", urgent="1").replace('<parameter name="rate">0.5</parameter>', ""), ref)
    assert one.score == 0.0 and "urgent: expected boolean" in one.info["reason"]  # schema: 1 is not a boolean
    no_schema = {"calls": [{"name": "pay", "arguments": {"flags": [True], "n": 1}}]}
    text = '<tool_call><invoke name="pay"><parameter name="flags">[1]</parameter><parameter name="n">true</parameter></invoke></tool_call>'
    assert tool_verifier(text, no_schema).score == 0.0


@needs_sandbox
def test_a_crash_hidden_by_closing_the_report_channel_fails_its_io_case():
    ref = {"io": [{"stdin": "", "stdout": ""}]}
    hidden, honest = score_batch("code", ["import os\nos.close(3)\nraise ValueError('crash')", "import sys\nsys.exit(0)"],
                                 [ref, ref], num_workers=1)
    assert hidden.score == 0.0 and "exited with code 1" in hidden.info["reason"], hidden.info
    assert honest.score == 1.0, honest.info
