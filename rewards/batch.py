"""`score_batch` / `ScorerPool`: score many completions in worker processes, each item bounded.

Workers are our own `python -m rewards._worker` subprocesses (not multiprocessing), so
the pool needs nothing from the caller's `__main__`, works from any thread and inside a
Ray actor, and never runs a verifier (or a sandboxed program) in the caller's process.
Each item gets `timeout_s` (default: its verifier's `ITEM_TIMEOUT_S`) from the moment its
worker receives it; on expiry the worker's
process group is killed (and every process of its sandbox uid swept), the item scores 0
with the reason, and a fresh worker takes its place. A worker that dies mid-item scores
that item 0 with its exit status and the tail of its stderr. A verifier that raises
scores its item 0 ("verifier error: ..."); an item that cannot be handed to a worker (not
a string, a reference nested too deeply or not JSON) scores 0 ("bad input: ..."). One
result per item, in order, whatever the items hold; nothing an item does fails the
batch; only a worker that cannot start at all (three times in a row) raises.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

from rewards import sandbox_cgroup
from rewards import sandbox_isolation as iso
from rewards.failures import BAD_INPUT, ITEM_TIMEOUT, VERIFIER_ERROR, WORKER_FAILED, scoring_failure
from rewards.sandbox import MODES as SANDBOX_MODES, SANDBOX_MODE_ENV, WORK_ROOT_ENV
from rewards.registry import RewardResult, get_verifier

_STARTUP_TIMEOUT_S = 60.0
# Per-item time limit by verifier, from their measured cost (BENCHMARKS.md, "Rewards";
# `python bench/bench_rewards.py --cost`): code
# runs a sandboxed program (wall limit 10 s, plus interpreter start-up and set-up); the
# others are in-process text work whose worst accepted input takes about a second or less
# once their imports are done (a worker's first item of a verifier gets FIRST_ITEM_GRACE_S
# more for them), so an item that needs more is stuck on an input it should have refused.
ITEM_TIMEOUT_S = {"code": 30.0, "math": 8.0, "ifeval": 5.0, "tool": 5.0, "format": 5.0}
DEFAULT_ITEM_TIMEOUT_S = 30.0  # a verifier not listed (e.g. a user's)
FIRST_ITEM_GRACE_S = 30.0  # added to a worker's first item of each verifier: its imports


def item_timeout_s(verifier: str) -> float:
    """The per-item time limit of `verifier` (ITEM_TIMEOUT_S, else DEFAULT_ITEM_TIMEOUT_S;
    a user's verifier may declare its own, `declared_timeout_s`)."""
    return declared_timeout_s(verifier) or ITEM_TIMEOUT_S.get(verifier, DEFAULT_ITEM_TIMEOUT_S)


def declared_timeout_s(verifier: str) -> float | None:
    """The limit a user's verifier (`package.module:function`) declares as its function's
    `timeout_s` attribute (seconds; it covers that verifier's first call's imports too, no
    FIRST_ITEM_GRACE_S is added), or None. A value that is not a positive number is a ValueError."""
    if ":" not in verifier:
        return None
    from rewards.registry import VERIFIERS

    limit = getattr(VERIFIERS.get(verifier), "timeout_s", None)
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 < limit < float("inf"):
        raise ValueError(f"verifier {verifier!r}: timeout_s must be a positive number of seconds, got {limit!r}")
    return float(limit)
MAX_TASK_DEPTH = 100  # containers in a task (the reference); deeper ones no JSON reader round-trips
DEFAULT_MAX_ERROR_RATE = 1.0  # stop only on a batch where the verifier failed on every item
MIN_ITEMS_FOR_ERROR_RATE = 8
_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class _Worker:
    proc: subprocess.Popen
    errlog: Any
    buf: bytearray = dataclasses.field(default_factory=bytearray)
    uid: int | None = None
    work_root: str | None = None
    ready: bool = False
    started: float = dataclasses.field(default_factory=time.monotonic)
    task: int | None = None
    deadline: float = 0.0
    limit_s: float = 0.0  # the current item's time limit
    warm: set = dataclasses.field(default_factory=set)  # verifiers this worker has run (imports done)

    def stderr_tail(self, n: int = 800) -> str:
        try:
            self.errlog.seek(0, os.SEEK_END)
            size = self.errlog.tell()
            self.errlog.seek(max(0, size - n))
            return self.errlog.read().decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""


def _spawn(sandbox_mode: str | None = None) -> _Worker:
    env = dict(os.environ)
    if sandbox_mode is not None:
        env[SANDBOX_MODE_ENV] = sandbox_mode
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PKG_PARENT, env.get("PYTHONPATH", "")) if p)
    # the worker's directory for per-run dirs is made here, so that the pool deletes it
    # also when it kills a worker that never said hello (it was left behind before)
    work_root = tempfile.mkdtemp(prefix="polymath-sbxw-")
    os.chmod(work_root, 0o711)
    env[WORK_ROOT_ENV] = work_root
    errlog = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rewards._worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=errlog, env=env, start_new_session=True, close_fds=True,
    )
    os.set_blocking(proc.stdout.fileno(), False)
    return _Worker(proc=proc, errlog=errlog, work_root=work_root)


def _kill(worker: _Worker) -> None:
    iso.kill_group(worker.proc.pid)
    try:
        worker.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover
        pass
    if worker.uid is not None:
        iso.sweep_uid(worker.uid)
    sandbox_cgroup.sweep_worker(worker.proc.pid)
    if worker.work_root:
        shutil.rmtree(worker.work_root, ignore_errors=True)
    for f in (worker.proc.stdin, worker.proc.stdout, worker.errlog):
        try:
            f.close()
        except OSError:
            pass


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether `value` nests lists/dicts deeper than `limit` (iterative: any depth is safe)."""
    stack = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list, tuple)):
            if d >= limit:
                return True
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False


def _task(i: int, name: str, completion: Any, reference: Any, options: dict) -> tuple[str, str | None]:
    """(the task line for a worker, None) or ("", why this item cannot be handed over)."""
    if not isinstance(completion, str):
        return "", f"completion must be a string, got {type(completion).__name__}"
    if nested_deeper_than(reference, MAX_TASK_DEPTH):
        return "", f"reference nested deeper than {MAX_TASK_DEPTH} levels"
    try:
        return json.dumps({"id": i, "name": name, "completion": completion, "reference": reference,
                           "options": options}), None
    except (TypeError, ValueError) as exc:
        return "", f"not JSON-serialisable: {exc}"


class ScorerPool:
    """A reusable set of scoring workers: `pool.score(name, completions, references)`."""

    def __init__(self, num_workers: int | None = None, timeout_s: float | None = None, sandbox: str | None = None,
                 max_error_rate: float = DEFAULT_MAX_ERROR_RATE) -> None:
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if sandbox is not None and sandbox not in SANDBOX_MODES:
            raise ValueError(f"sandbox must be one of {SANDBOX_MODES}, got {sandbox!r}")
        self.sandbox = sandbox  # the code sandbox mode of the workers (None: POLYMATH_SANDBOX or 'isolated')
        self.num_workers = num_workers or max(1, len(os.sched_getaffinity(0)))
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers!r}")
        self.timeout_s = None if timeout_s is None else float(timeout_s)  # None: per verifier (`item_timeout_s`)
        self.max_error_rate = validate_error_rate(max_error_rate)  # read by `engine.episode.verified_scores`
        self._workers: list[_Worker] = []
        self._failed_starts = 0
        self._item_timeout_s, self._name, self._declared = self.timeout_s or DEFAULT_ITEM_TIMEOUT_S, "", False

    def __enter__(self) -> "ScorerPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for w in self._workers:
            _kill(w)
        self._workers = []

    def score(
        self, name: str, completions: Sequence[str], references: Sequence[dict], **options: Any
    ) -> list[RewardResult]:
        get_verifier(name)  # unknown name: fail now, listing the known ones
        if len(completions) != len(references):
            raise ValueError(f"{len(completions)} completions but {len(references)} references")
        tasks: list[str] = []
        results: list[RewardResult | None] = [None] * len(completions)
        for i, (c, r) in enumerate(zip(completions, references)):
            task, problem = _task(i, name, c, r, options)
            tasks.append(task)
            if problem:
                results[i] = RewardResult(0.0, {"reason": f"{BAD_INPUT}: {problem}"})
        self._item_timeout_s, self._name = self.timeout_s or item_timeout_s(name), name
        self._declared = self.timeout_s is None and declared_timeout_s(name) is not None  # kept as declared
        pending = collections.deque(i for i in range(len(tasks)) if results[i] is None)
        while pending or any(w.task is not None for w in self._workers):
            self._top_up(len(pending))
            self._dispatch(pending, tasks, results)
            self._wait(results)
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _top_up(self, n_pending: int) -> None:
        idle = sum(1 for w in self._workers if w.task is None)
        while len(self._workers) < self.num_workers and idle < n_pending:
            self._workers.append(_spawn(self.sandbox))
            idle += 1

    def _dispatch(self, pending: collections.deque, tasks: list[str], results: list) -> None:
        for w in self._workers:
            if w.ready and w.task is None and pending:
                i = pending.popleft()
                # a worker's first item of a verifier also pays its imports (math-verify +
                # sympy: seconds on a loaded machine), outside the verifier's own limit
                # (a limit the caller set is kept as it is)
                cold = self.timeout_s is None and self._name not in w.warm and not self._declared
                w.limit_s = self._item_timeout_s + (FIRST_ITEM_GRACE_S if cold else 0.0)
                w.warm.add(self._name)
                w.task, w.deadline = i, time.monotonic() + w.limit_s
                try:
                    w.proc.stdin.write((tasks[i] + "\n").encode())
                    w.proc.stdin.flush()
                except OSError:
                    self._retire(w, results, f"{WORKER_FAILED} died before taking the item")

    def _wait(self, results: list) -> None:
        now = time.monotonic()
        deadlines = [w.deadline if w.task is not None else w.started + _STARTUP_TIMEOUT_S for w in self._workers]
        timeout = max(0.0, min(deadlines, default=now + 1.0) - now)
        with selectors.DefaultSelector() as sel:
            for w in self._workers:
                sel.register(w.proc.stdout.fileno(), selectors.EVENT_READ, w)
            for key, _ in sel.select(min(timeout, 1.0)):
                self._read(key.data, results)
        now = time.monotonic()
        for w in list(self._workers):
            if w.task is not None and now > w.deadline:
                self._retire(w, results, f"{ITEM_TIMEOUT} {w.limit_s:g}s")
            elif not w.ready and now > w.started + _STARTUP_TIMEOUT_S:
                self._retire(w, results, f"{WORKER_FAILED} did not start")

    def _read(self, w: _Worker, results: list) -> None:
        try:
            data = os.read(w.proc.stdout.fileno(), 1 << 20)
        except BlockingIOError:
            return
        if not data:
            code = w.proc.wait()
            why = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            self._retire(w, results, f"{WORKER_FAILED} crashed ({why}): {w.stderr_tail()}")
            return
        w.buf += data
        while b"\n" in w.buf:
            line, _, rest = bytes(w.buf).partition(b"\n")
            w.buf = bytearray(rest)
            try:
                msg = json.loads(line)
                if "hello" in msg:
                    w.ready, w.uid, self._failed_starts = True, msg.get("uid"), 0
                elif w.task is not None and msg.get("id") in (w.task, None):
                    results[w.task] = RewardResult(msg["score"], msg["info"])
                    w.task = None
            except (ValueError, TypeError, KeyError, RecursionError) as exc:
                self._retire(w, results, f"{WORKER_FAILED} sent an unreadable result: {exc!r:.200}")
                return

    def _retire(self, w: _Worker, results: list, reason: str) -> None:
        """Kill `w`; its item (if any) scores 0 with `reason`; a worker that never started counts."""
        _kill(w)
        self._workers.remove(w)
        if w.task is not None:
            results[w.task] = RewardResult(0.0, {"reason": reason})
        elif not w.ready:
            self._failed_starts += 1
            if self._failed_starts >= 3:
                raise RuntimeError(f"scoring workers fail to start: {reason}: {w.stderr_tail()}")


def score_batch(
    name: str,
    completions: Sequence[str],
    references: Sequence[dict],
    num_workers: int | None = None,
    timeout_s: float | None = None,
    **options: Any,
) -> list[RewardResult]:
    """Score `completions` against `references` with verifier `name` in worker processes."""
    n = len(completions)
    workers = min(num_workers or max(1, len(os.sched_getaffinity(0))), max(1, n))
    with ScorerPool(num_workers=workers, timeout_s=timeout_s) as pool:
        return pool.score(name, completions, references, **options)




def validate_error_rate(rate: Any, what: str = "max_error_rate") -> float:
    """`rate` as a float in (0, 1]; ValueError naming `what` otherwise."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < float(rate) <= 1.0:
        raise ValueError(f"{what} must be a number in (0, 1], got {rate!r}")
    return float(rate)


def count_failures(results: Sequence[RewardResult]) -> dict[str, int]:
    """How many results are not verdicts, by kind: {"verifier_errors", "timeouts",
    "worker_failures", "bad_inputs"} (all keys present; `rewards.failures`)."""
    counts = {"verifier_errors": 0, "timeouts": 0, "worker_failures": 0, "bad_inputs": 0}
    keys = {VERIFIER_ERROR: "verifier_errors", ITEM_TIMEOUT: "timeouts", WORKER_FAILED: "worker_failures",
            BAD_INPUT: "bad_inputs"}
    for r in results:
        reason = scoring_failure(r.info)
        if reason is not None:
            counts[next(v for k, v in keys.items() if reason.startswith(k))] += 1
    return counts


def check_verifier_errors(results: Sequence[RewardResult], verifier: str, where: str,
                          max_error_rate: float = DEFAULT_MAX_ERROR_RATE,
                          min_items: int = MIN_ITEMS_FOR_ERROR_RATE) -> None:
    """Raise when at least `max_error_rate` of a batch of at least `min_items` items
    failed inside the verifier (VERIFIER_ERROR); below that rate each such item is only
    its row's 0 (counted in the step's metrics), never the stage's end.

    Bad model output should never do this (verifiers score it 0 with a reason and do not
    raise; the worker turns any exception that escapes into that row's 0); a batch of
    verifier errors is a broken environment (a sandbox that cannot start the interpreter,
    a missing dependency), and training or evaluating on its all-zero rewards would go on
    silently. The default, 1.0, stops only when every item failed."""
    max_error_rate = validate_error_rate(max_error_rate)
    if len(results) < min_items:
        return
    reasons = [str((r.info or {}).get("reason", "")) for r in results]
    errors = [x for x in reasons if x.startswith(VERIFIER_ERROR)]
    if errors and len(errors) >= max_error_rate * len(results):
        share = f"all {len(results)}" if len(errors) == len(results) else f"{len(errors)} of {len(results)}"
        raise RuntimeError(f"{where}: the {verifier!r} verifier raised on {share} items (max_verifier_error_rate "
                           f"{max_error_rate:g}; an environment problem, not the model's output); "
                           f"first: {errors[0][:500]}")


def raise_if_all_verifier_errors(results: Sequence[RewardResult], verifier: str, where: str,
                                 min_items: int = MIN_ITEMS_FOR_ERROR_RATE) -> None:
    """`check_verifier_errors` at rate 1.0: raise only when every item failed in the verifier."""
    check_verifier_errors(results, verifier, where, 1.0, min_items)
