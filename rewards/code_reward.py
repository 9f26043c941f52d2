"""`code` verifier: run the completion's Python against the reference's tests, sandboxed.

Reference: `{"tests": ["assert f(2) == 4", ...], "setup": "<optional code run first>"}`
(MBPP's `test_list` style), optional `"all_or_nothing": true`. Every test must be one
`assert <expression>` statement. Or `{"io": [{"stdin": "...", "stdout": "..."}, ...]}`:
the program runs as `__main__` once per case (stdin fed, stderr discarded) and its
stdout is compared here, trailing whitespace of lines and trailing blank lines ignored;
an uncaught exception fails the case. Score = fraction of tests passed (1.0 / 0.0 with
`all_or_nothing`, from the reference or a verifier keyword).

The program is the LAST fenced code block (```python, ```py or bare ```), else the whole
completion. The verdict is decided here, never inside the program's interpreter
(`rewards.code_tests`): each test is split into the parts that need the program
("calls", e.g. `f(2)`) and the rest (the comparison and the expected value, e.g.
`== 4`), which never leave this process: expected values are computed without the
program, by a restricted evaluator here (`rewards.code_expected`: `'abc'[::-1]`,
`list(range(3))`, comprehensions) or, when they are made of names the reference's
`setup` binds (`assert f(2) == K`), by a sandboxed run of the setup alone before the
program's (cached per worker). A harness in the sandbox reads the setup, the
program and the calls' sources from stdin (a random nonce with them), compiles and runs
the setup and the program, evaluates each call, and writes one line per call with its
value encoded as plain data (or the exception) to a private pipe (fd 3). This process
decodes each value into its own plain types (an object of the program's, with its
`__eq__`, never survives) and evaluates each test's verdict on them. A program that
patches builtins, walks frames or `gc`, prints fake results, exits early, catches
`BaseException`, forks or starts threads can at most make a call's reply carry some
value; it passes only if that value is the expected one. A call answered more than
once fails. `SystemExit` raised by the program itself ends the run (it exited before
its tests); raised inside a call it fails that call. The program runs with `__name__
== "solution"`, so its `if __name__ == "__main__":` demo block does not run.

The sandbox fails closed (`rewards.sandbox`): where it cannot be set up the verifier
raises (the item scores 0 as a verifier error, and a batch of only those stops the
stage) unless the `sandbox` option (or `POLYMATH_SANDBOX`) is `unsafe-local`.
"""

from __future__ import annotations

import functools
import json
import secrets
import signal
from typing import Any

from rewards import code_tests, sandbox
from rewards.registry import RewardResult, register, register_reference_check
from rewards.sandbox import SandboxOutcome, run_python
from rewards.sandbox_isolation import SandboxLimits

_FENCE_LANGS = ("python3", "python", "py")  # longest first, as the alternation `python3?|py` tries them
_MAX_REPLY = 512 << 10  # bytes of one encoded call result

HARNESS = r'''
import os, sys
''' + code_tests.ENCODER_SOURCE + r'''
def _fmt(exc):
    try:
        return (type(exc).__name__ + ": " + str(exc))[-500:]
    except BaseException:
        return "unprintable exception"

def _fields(data):
    out, pos = [], 0
    while pos < len(data):
        nl = data.index(b"\n", pos)
        n = int(data[pos:nl])
        out.append(data[nl + 1:nl + 1 + n].decode("utf-8", "surrogatepass"))
        pos = nl + 1 + n
    return out

def _main():
    nonce, setup, program, *calls = _fields(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    write, exit_now, _eval, _compile, enc, s = os.write, os._exit, eval, compile, _encode, _s
    head = '{"n":"' + nonce + '"'

    def emit(body):
        line = (head + body + "}\n").encode()
        if len(line) > MAX_REPLY:
            line = (head + ',"i":' + str(i) + ',"e":' + s("result too large (%d bytes encoded)" % len(line)) + "}\n").encode()
        while line:
            line = line[write(3, line):]

    g = {"__name__": "solution", "__builtins__": __builtins__}
    for stage, src in (("setup", setup), ("program", program)):
        if not src:
            continue
        try:
            code = _compile(src, "<" + stage + ">", "exec", dont_inherit=True)
        except BaseException as exc:
            emit(',"stage":"' + stage + '","compile_error":' + s(_fmt(exc)))
            return
        try:
            exec(code, g)
        except SystemExit:
            raise
        except BaseException as exc:
            emit(',"stage":"' + stage + '","error":' + s(_fmt(exc)))
            return
    del setup, program
    emit(',"stage":"loaded"')
    i = 0
    for i, src in enumerate(calls):
        try:
            body = ',"i":' + str(i) + ',"v":' + enc(_eval(_compile(src, "<test call %d>" % i, "eval", dont_inherit=True), g))
        except BaseException as exc:
            body = ',"i":' + str(i) + ',"e":' + s(_fmt(exc))
        emit(body)
    emit(',"stage":"done"')
    for stream in (sys.stdout, sys.stderr):  # the program's prints (informational only)
        try:
            stream.flush()
        except BaseException:
            pass
    exit_now(0)

MAX_REPLY = __MAX_REPLY__
_main()
'''.replace("__MAX_REPLY__", str(_MAX_REPLY))


IO_HARNESS = r'''
import os, sys
def _main():
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    head = b""
    while not head.endswith(b"\n"):
        c = os.read(0, 1)
        if not c:
            os._exit(2)
        head += c
    n, src = int(head), b""
    while len(src) < n:
        c = os.read(0, n - len(src))
        if not c:
            os._exit(2)
        src += c
    report = lambda kind, exc: os.write(3, (kind + ":" + type(exc).__name__ + ": " + str(exc))[:500].encode("utf-8", "replace"))
    try:
        code = compile(src.decode("utf-8", "surrogatepass"), "<program>", "exec", dont_inherit=True)
    except BaseException as exc:
        report("compile", exc)
        os._exit(1)
    del src
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit:
        pass
    except BaseException as exc:
        try:
            report("raised", exc)
        except BaseException:
            pass
        os._exit(1)
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    os._exit(0)
_main()
'''


def _normalise_output(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.splitlines()).rstrip()


def _score_io(code: str, how: str, cases: list[dict], all_or_nothing: bool, limits: SandboxLimits,
              mode: str) -> RewardResult:
    """stdin/stdout cases: one sandboxed run each, the output compared here."""
    src = code.encode("utf-8", "surrogatepass")
    passed, errors, isolation = [], {}, {}
    for i, case in enumerate(cases):
        out = run_python(["-c", IO_HARNESS], b"%d\n" % len(src) + src + case.get("stdin", "").encode("utf-8", "surrogatepass"),
                         limits, mode)
        isolation = out.isolation
        err = out.channel.decode("utf-8", "replace")
        if err.startswith("compile:"):
            errors = {"compile": err[len("compile:"):]}
            passed = [False] * len(cases)
            break
        if err.startswith("raised:"):
            why = f"raised {err[len('raised:'):]}"
        elif out.timed_out or out.output_exceeded or (out.returncode or 0) != 0:
            # any non-zero exit fails the case: the harness exits 0 after the program's own
            # `sys.exit`, and 1 when it raised, also if it closed the report channel first
            why = _describe_exit(out, limits)
        elif out.output_truncated:
            why = f"output longer than {limits.max_output_bytes} bytes"
        elif _normalise_output(out.output) != _normalise_output(case["stdout"]):
            why = f"wrong output: {out.output[:200]!r}"
        else:
            why = None
        passed.append(why is None)
        if why is not None:
            errors[f"case {i}"] = why
    frac = sum(passed) / len(cases)
    info: dict[str, Any] = {"extracted": how, "passed": passed, "fraction_passed": frac, "isolation": isolation,
                            "network_isolation": isolation.get("network"), "sandbox": isolation.get("mode")}
    if "compile" in errors:
        info["reason"] = f"program does not compile: {errors['compile']}"
    elif errors:
        info["reason"] = "failed cases: " + "; ".join(f"{k}: {v}" for k, v in list(errors.items())[:3])
    return RewardResult(float(all(passed)) if all_or_nothing else frac, info)


def _frame(*fields: str) -> bytes:
    out = bytearray()
    for f in fields:
        b = f.encode("utf-8", "surrogatepass")
        out += b"%d\n" % len(b) + b
    return bytes(out)


def _fence_body_start(text: str, pos: int) -> int | None:
    """Where the body of a fence opening at `pos` (```) starts: after "```", blanks, an
    optional `python3` / `python` / `py` (any case), blanks and a newline; None if the
    line is not such a header. Scans only the header's own characters (the regex
    `[ \t]*(?:python3?|py)?[ \t]*\n` backtracked over every split of a run of blanks
    between its two `[ \t]*`: a fence followed by 200k spaces took 156 s)."""
    n, i = len(text), pos + 3
    while i < n and text[i] in " \t":
        i += 1
    head = text[i:i + 7].lower()
    for lang in _FENCE_LANGS:
        if head.startswith(lang):
            j = i + len(lang)
            while j < n and text[j] in " \t":
                j += 1
            if j < n and text[j] == "\n":
                return j + 1
            break
    return i + 1 if i < n and text[i] == "\n" else None


def extract_code(completion: str) -> tuple[str, str]:
    """(code, how): last closed fenced block, else text after an unclosed fence, else all.

    One left-to-right pass over the "```" marks: a header opens a block that the next
    "```" closes (the regex `(.*?)```` non-overlapping findall), a mark that is no
    header is skipped one character on; the text after the last header with no close
    is the unclosed block."""
    last_block, last_open, pos = None, None, 0
    while (start := completion.find("```", pos)) != -1:
        body = _fence_body_start(completion, start)
        if body is None:
            pos = start + 1
            continue
        close = completion.find("```", body)
        if close == -1:
            last_open = body
            break
        last_block, pos = completion[body:close], close + 3
    if last_block is not None:
        return last_block, "fenced"
    if last_open is not None:
        return completion[last_open:], "unclosed_fence"
    return completion, "whole_text"


def _text(obj: Any) -> str:
    try:
        v = code_tests.decode_obj(obj)
    except ValueError:
        return "unreadable message"
    return v[:500] if isinstance(v, str) else "unreadable message"


def _parse_channel(channel: bytes, nonce: str, n_calls: int) -> tuple[list[Any], dict[str, Any]]:
    """One decoded value (or `code_tests.failed(...)`) per call, and the run's stage state."""
    replies: list[Any] = [None] * n_calls
    seen = [0] * n_calls
    state: dict[str, Any] = {"loaded": False, "done": False, "errors": {}}
    for line in channel.decode("utf-8", "replace").splitlines():
        if nonce not in line:
            continue
        try:
            msg = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(msg, dict) or msg.get("n") != nonce:
            continue
        i = msg.get("i")
        if msg.get("stage") in ("loaded", "done") and i is None:
            state[msg["stage"]] = True
        elif msg.get("stage") in ("setup", "program") and i is None:
            key = "compile" if "compile_error" in msg else msg["stage"]
            state["errors"].setdefault(key, _text(msg.get("compile_error", msg.get("error"))))
        elif type(i) is int and 0 <= i < n_calls:
            seen[i] += 1
            if "v" in msg:
                try:
                    replies[i] = code_tests.decode_obj(msg["v"])
                except ValueError as exc:
                    replies[i] = code_tests.failed(f"unusable result: {exc}")
            else:
                replies[i] = code_tests.failed(_text(msg.get("e")))
    for i in range(n_calls):
        if seen[i] == 0:
            replies[i] = code_tests.failed("no result (the program ended first)")
        elif seen[i] > 1:
            replies[i] = code_tests.failed(f"{seen[i]} results for one call")
    return replies, state


def _describe_exit(out: SandboxOutcome, limits: SandboxLimits) -> str:
    if out.timed_out:
        return f"timeout: wall-clock limit of {limits.wall_s:g}s exceeded"
    if out.output_exceeded:
        return "output limit exceeded"
    rc = out.returncode
    if rc is not None and rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
        hint = {"SIGXCPU": " (CPU limit)", "SIGXFSZ": " (file-size limit)"}.get(name, "")
        if out.memory_exceeded:
            hint = f" (memory limit of {limits.memory_bytes} bytes for the whole program)"
        return f"killed by {name}{hint}"
    return f"exited with code {rc}"


def _reason(passed: list[bool], errors: dict[str, str], state: dict[str, Any], out: SandboxOutcome,
            limits: SandboxLimits) -> str | None:
    if all(passed):
        return None
    if "compile" in state["errors"] and "setup" not in state["errors"]:
        return f"program does not compile: {state['errors']['compile']}"
    for stage in ("setup", "program"):
        if stage in state["errors"]:
            return f"{stage} raised: {state['errors'][stage]}"
    if not state["loaded"]:
        return f"program ended before its tests ran ({_describe_exit(out, limits)})"
    if not state["done"]:
        return f"tests did not finish ({_describe_exit(out, limits)})"
    return "failed tests: " + "; ".join(f"{k}: {v}" for k, v in list(errors.items())[:3])


def _limits_from(options: dict[str, Any]) -> SandboxLimits:
    keys = {f for f in SandboxLimits.__dataclass_fields__}
    return SandboxLimits(**{k: v for k, v in options.items() if k in keys})


def _io_problem(cases: Any) -> str | None:
    if not isinstance(cases, list) or not cases:
        return f"code reference 'io' must be a non-empty list of {{'stdin', 'stdout'}} cases, got {cases!r:.200}"
    for i, case in enumerate(cases):
        if not (isinstance(case, dict) and set(case) <= {"stdin", "stdout"} and isinstance(case.get("stdout"), str)
                and isinstance(case.get("stdin", ""), str)):
            return f"code reference io[{i}] must be {{'stdin': str, 'stdout': str}}, got {case!r:.200}"
    return None


@register_reference_check("code")
def reference_problem(reference: Any) -> str | None:
    if isinstance(reference, dict) and "io" in reference:
        if "tests" in reference:
            return "code reference must have 'tests' or 'io', not both"
        return _io_problem(reference["io"])
    tests = reference.get("tests") if isinstance(reference, dict) else None
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        return f"code reference must have a non-empty list of strings 'tests', got {reference!r:.200}"
    if not isinstance(reference.get("setup") or "", str):
        return f"code reference 'setup' must be a string, got {type(reference['setup']).__name__}"
    try:
        _plans(tuple(tests), reference.get("setup") or "")
    except ValueError as exc:
        return str(exc)
    return None


@functools.lru_cache(maxsize=256)
def _plans(tests: tuple[str, ...], setup: str = "") -> tuple[code_tests.TestPlan, ...]:
    bound = code_tests.setup_names(setup)
    return tuple(code_tests.parse_test(t, bound) for t in tests)


@functools.lru_cache(maxsize=64)
def _setup_values(setup: str, exprs: tuple[str, ...], limits: SandboxLimits, mode: str) -> tuple[Any, ...]:
    """The expected values made of the setup's names, from a sandboxed run of the setup
    ALONE (no program in that interpreter), decoded here; cached per worker, so a group
    of completions of one prompt pays for it once."""
    nonce = secrets.token_hex(16)
    out = run_python(["-c", HARNESS], _frame(nonce, setup, "", *exprs), limits, mode)
    values, state = _parse_channel(out.channel, nonce, len(exprs))
    if not state["loaded"]:
        why = next(iter(state["errors"].values()), None) or _describe_exit(out, limits)
        values = [code_tests.failed(f"the setup alone did not run: {why}")] * len(exprs)
    return tuple(values)


@register("code")
def code_verifier(completion: str, reference: dict[str, Any], **options: Any) -> RewardResult:
    """Fraction of `reference["tests"]` (or `["io"]` cases) the sandboxed program passes."""
    problem = reference_problem(reference)
    if problem:
        raise ValueError(problem)
    tests = reference.get("tests")
    setup = reference.get("setup") or ""
    all_or_nothing = bool(options.get("all_or_nothing", reference.get("all_or_nothing", False)))
    limits = _limits_from(options)
    mode = options.get("sandbox") or sandbox.default_mode()
    if mode not in sandbox.MODES:
        raise ValueError(f"code verifier option sandbox={mode!r}: must be one of {sandbox.MODES}")
    if not sandbox.IN_WORKER:  # never run untrusted code from the caller's process
        from rewards.batch import score_batch

        return score_batch("code", [completion], [reference], num_workers=1, timeout_s=limits.wall_s + 30, **options)[0]
    code, how = extract_code(completion)
    if "io" in reference:
        return _score_io(code, how, reference["io"], all_or_nothing, limits, mode)
    plans = _plans(tuple(tests), setup)
    calls = [c for p in plans for c in p.calls]
    setup_exprs = tuple(e for p in plans for e in p.setup_exprs)
    expected = list(_setup_values(setup, setup_exprs, limits, mode)) if setup_exprs else []
    nonce = secrets.token_hex(16)
    out = run_python(["-c", HARNESS], _frame(nonce, setup, code, *calls), limits, mode)
    replies, state = _parse_channel(out.channel, nonce, len(calls))
    passed, errors, k, j = [], {}, 0, 0
    for t, plan in enumerate(plans):
        mine, k = replies[k:k + len(plan.calls)], k + len(plan.calls)
        theirs, j = expected[j:j + len(plan.setup_exprs)], j + len(plan.setup_exprs)
        ok, why = code_tests.verdict(plan, mine, theirs) if state["loaded"] else (False, "program not loaded")
        passed.append(ok)
        if not ok:
            errors[f"test {t}"] = why
    frac = sum(passed) / len(tests)
    score = float(all(passed)) if all_or_nothing else frac
    info: dict[str, Any] = {
        "extracted": how, "passed": passed, "fraction_passed": frac, "returncode": out.returncode,
        "timed_out": out.timed_out, "wall_s": round(out.wall_s, 4), "output_tail": out.output[-2000:],
        "output_truncated": out.output_truncated, "isolation": out.isolation,
        "network_isolation": out.isolation["network"], "sandbox": out.isolation["mode"],
    }
    reason = _reason(passed, errors, state, out, limits)
    if reason:
        info["reason"] = reason
    return RewardResult(score, info)
