"""`code` verifier: run the completion's Python against the reference's tests, sandboxed.

Reference: `{"tests": ["assert f(2) == 4", ...], "setup": "<optional code run first>"}`
(MBPP's `test_list` style), optional `"all_or_nothing": true`.
Score = fraction of tests passed (1.0 / 0.0 with `all_or_nothing`, from the reference or
a verifier keyword).

The program is the LAST fenced code block (```python, ```py or bare ```), else the whole
completion. A harness runs in the sandbox: it reads a random nonce from stdin (then
points stdin at /dev/null), reads and deletes its spec file, executes `setup`, then the
program, then each test in one namespace, and after each test writes a line
`{"nonce", "test", "ok"}` to a private pipe. The parent counts only lines carrying the
nonce, so a program that exits early (`sys.exit`, `os._exit`, a crash, a kill) leaves
the remaining tests unpassed, and printing fake results to stdout does nothing.
`SystemExit` raised by the program itself ends the run (it exited before its tests);
raised inside a test it fails that test. The program runs with `__name__ ==
"solution"`, so its `if __name__ == "__main__":` demo block does not run (it would
often block on `input()`).

Not defended: a program that introspects the interpreter (frames, `gc`) to find the
nonce, or monkeypatches what the tests use (e.g. an `__eq__` that is always true).
This harness protects against crashes and early exits, not a determined adversary.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
from typing import Any

from rewards import sandbox
from rewards.registry import RewardResult, register, register_reference_check
from rewards.sandbox import SandboxOutcome, run_python
from rewards.sandbox_isolation import SandboxLimits

_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_OPEN_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n", re.IGNORECASE)

HARNESS = r'''
import json, os, sys, traceback

def _fmt(exc):
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()[-500:]

def _main():
    nonce = sys.stdin.readline().strip()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    out = os.fdopen(int(sys.argv[1]), "w", buffering=1)
    dumps = json.dumps
    with open("spec.json", encoding="utf-8") as fh:
        spec = json.load(fh)
    os.remove("spec.json")

    def emit(**kw):
        kw["nonce"] = nonce
        out.write(dumps(kw) + "\n")
        out.flush()

    g = {"__name__": "solution", "__builtins__": __builtins__}
    for stage in ("setup", "program"):
        if not spec[stage]:
            continue
        try:
            exec(compile(spec[stage], "<" + stage + ">", "exec"), g)
        except SystemExit:
            raise
        except BaseException as exc:
            emit(stage=stage, error=_fmt(exc))
            return
    emit(stage="loaded")
    for i, test in enumerate(spec["tests"]):
        try:
            exec(compile(test, "<test %d>" % i, "exec"), g)
            emit(test=i, ok=True)
        except BaseException as exc:
            emit(test=i, ok=False, error=_fmt(exc))
    emit(stage="done")

_main()
'''


def extract_code(completion: str) -> tuple[str, str]:
    """(code, how): last closed fenced block, else text after an unclosed fence, else all."""
    blocks = _FENCE_RE.findall(completion)
    if blocks:
        return blocks[-1], "fenced"
    opens = list(_OPEN_FENCE_RE.finditer(completion))
    if opens:
        return completion[opens[-1].end() :], "unclosed_fence"
    return completion, "whole_text"


def _parse_channel(channel: bytes, nonce: str, n_tests: int) -> tuple[list[bool], dict[str, Any]]:
    passed = [False] * n_tests
    state: dict[str, Any] = {"loaded": False, "done": False, "errors": {}}
    for line in channel.decode("utf-8", "replace").splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if not isinstance(msg, dict) or msg.get("nonce") != nonce:
            continue
        if msg.get("stage") in ("loaded", "done"):
            state[msg["stage"]] = True
        elif msg.get("stage") in ("setup", "program"):
            state["errors"][msg["stage"]] = msg.get("error", "")
        elif isinstance(msg.get("test"), int) and 0 <= msg["test"] < n_tests:
            passed[msg["test"]] = msg.get("ok") is True
            if msg.get("ok") is not True:
                state["errors"][f"test {msg['test']}"] = msg.get("error", "")
    return passed, state


def _describe_exit(out: SandboxOutcome, limits: SandboxLimits) -> str:
    if out.timed_out:
        return f"timeout: wall-clock limit of {limits.wall_s:g}s exceeded"
    if out.output_exceeded:
        return "output limit exceeded"
    rc = out.returncode
    if rc is not None and rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
        hint = {"SIGXCPU": " (CPU limit)", "SIGXFSZ": " (file-size limit)"}.get(name, "")
        return f"killed by {name}{hint}"
    return f"exited with code {rc}"


def _reason(passed: list[bool], state: dict[str, Any], out: SandboxOutcome, limits: SandboxLimits) -> str | None:
    if all(passed):
        return None
    for stage in ("setup", "program"):
        if stage in state["errors"]:
            return f"{stage} raised: {state['errors'][stage]}"
    if not state["loaded"]:
        return f"program ended before its tests ran ({_describe_exit(out, limits)})"
    if not state["done"]:
        return f"tests did not finish ({_describe_exit(out, limits)})"
    return "failed tests: " + "; ".join(f"{k}: {v}" for k, v in list(state["errors"].items())[:3])


def _syntax_error(code: str) -> str | None:
    """The program's SyntaxError, found by compiling (never executing) it in this worker."""
    if "\x00" in code:
        return "source contains NUL bytes"
    try:
        compile(code, "<program>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        return f"{type(exc).__name__}: {exc}"[:300]
    return None


def _limits_from(options: dict[str, Any]) -> SandboxLimits:
    keys = {f for f in SandboxLimits.__dataclass_fields__}
    return SandboxLimits(**{k: v for k, v in options.items() if k in keys})


@register_reference_check("code")
def reference_problem(reference: Any) -> str | None:
    tests = reference.get("tests") if isinstance(reference, dict) else None
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        return f"code reference must have a non-empty list of strings 'tests', got {reference!r:.200}"
    if not isinstance(reference.get("setup") or "", str):
        return f"code reference 'setup' must be a string, got {type(reference['setup']).__name__}"
    return None


@register("code")
def code_verifier(completion: str, reference: dict[str, Any], **options: Any) -> RewardResult:
    """Fraction of `reference["tests"]` the sandboxed program passes."""
    problem = reference_problem(reference)
    if problem:
        raise ValueError(problem)
    tests = reference["tests"]
    setup = reference.get("setup") or ""
    all_or_nothing = bool(options.get("all_or_nothing", reference.get("all_or_nothing", False)))
    limits = _limits_from(options)
    if not sandbox.IN_WORKER:  # never run untrusted code from the caller's process
        from rewards.batch import score_batch

        return score_batch("code", [completion], [reference], num_workers=1, timeout_s=limits.wall_s + 30, **options)[0]
    code, how = extract_code(completion)
    syntax = _syntax_error(code)
    if syntax is not None:  # nothing can pass: skip the sandbox (most untrained samples land here)
        return RewardResult(0.0, {"extracted": how, "passed": [False] * len(tests), "fraction_passed": 0.0,
                                  "reason": f"program does not compile: {syntax}"})
    nonce = secrets.token_hex(16)
    spec = json.dumps({"setup": setup, "program": code, "tests": tests})
    out = run_python({"harness.py": HARNESS, "spec.json": spec}, "harness.py", ["{channel_fd}"],
                     (nonce + "\n").encode(), limits)
    passed, state = _parse_channel(out.channel, nonce, len(tests))
    frac = sum(passed) / len(tests)
    score = float(all(passed)) if all_or_nothing else frac
    info: dict[str, Any] = {
        "extracted": how, "passed": passed, "fraction_passed": frac, "returncode": out.returncode,
        "timed_out": out.timed_out, "wall_s": round(out.wall_s, 4), "output_tail": out.output[-2000:],
        "output_truncated": out.output_truncated, "isolation": out.isolation,
        "network_isolation": out.isolation["network"],
    }
    reason = _reason(passed, state, out, limits)
    if reason:
        info["reason"] = reason
    return RewardResult(score, info)
