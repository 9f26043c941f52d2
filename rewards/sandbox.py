"""Run one untrusted Python program in a sandboxed child process and collect what it said.

`run_python` makes a fresh working directory, starts `python -I -S -B SCRIPT` there under
the isolation of `rewards.sandbox_isolation` (own session, namespaces, rlimits, a
throwaway uid), with a minimal environment (nothing inherited: no secrets, HOME and
TMPDIR point into the working directory), stdout+stderr merged and capped, and an extra
"result channel" pipe the harness writes to. The wall-clock limit is enforced here: on
expiry, or once the program has exited, everything it started is killed (its uid swept,
or its process group killed), then the working directory is deleted.

The sandbox must be started from a process whose other threads do not hold locks the
child needs (it uses `preexec_fn`); `score_batch` runs it in single-threaded worker
processes. Runs are serialised per process because the process's sandbox uid is shared.
"""

from __future__ import annotations

import dataclasses
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time

from rewards import sandbox_isolation as iso

_CHANNEL_CAP = 1 << 20
_HARD_OUTPUT_FACTOR = 16  # output beyond max_output_bytes * this kills the program
_EXIT_GRACE_S = 0.2  # after the main process exits, how long pipes may still drain

# Set by the worker process (rewards._worker): orphans re-parent to it, so it reaps all.
REAP_ALL_CHILDREN = False
# True inside a scoring worker; elsewhere the code verifier hands its run to a worker.
IN_WORKER = False
# Parent of the per-run directories (a worker sets its own, which the pool deletes if it
# has to kill the worker mid-run); None = the system temp directory.
WORK_ROOT: str | None = None


def _interpreter(private_tmp: bool) -> str:
    """The real interpreter behind `sys.executable`. A venv's `python` is a symlink, and a
    venv under /tmp vanishes under the sandbox's private /tmp; `-I -S` needs nothing of
    the venv. An interpreter that itself lives under a covered directory cannot run."""
    exe = os.path.realpath(sys.executable)
    if private_tmp:
        for top in iso.WRITABLE_MOUNTS:
            if exe.startswith(top.rstrip("/") + "/"):
                raise RuntimeError(f"the Python interpreter {exe} lies under {top}, which the code sandbox "
                                   "replaces with the program's working directory; use a Python installed "
                                   "elsewhere")
    return exe


@dataclasses.dataclass
class SandboxOutcome:
    returncode: int | None
    output: str
    output_truncated: bool
    output_exceeded: bool
    channel: bytes
    timed_out: bool
    wall_s: float
    isolation: dict[str, str]


def _isolation_plan(workdir: str, limits: iso.SandboxLimits) -> tuple[iso.IsolationPlan, dict[str, str]]:
    caps = iso.probe()
    masks = iso.python_masks()
    mounts = caps["filesystem"]
    uid_ok = caps["uid"] and (mounts or not masks)
    uid = iso.LEASE.acquire() if uid_ok else None
    plan = iso.IsolationPlan(
        workdir=workdir, uid=uid, network=caps["network"], mounts=mounts, masks=masks if mounts else (), limits=limits
    )
    report = {
        "network": "namespace" if caps["network"] else "unavailable",
        "filesystem": "namespace" if mounts else "unavailable",
        "uid": str(uid) if uid is not None else "unavailable",
    }
    return plan, report


def _minimal_env(home: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def _prepare_workdir(files: dict[str, str]) -> str:
    workdir = tempfile.mkdtemp(prefix="polymath-sbx-", dir=WORK_ROOT)
    for name, text in files.items():
        if os.sep in name or name.startswith("."):
            raise ValueError(f"sandbox file name must be a plain name, got {name!r}")
        path = os.path.join(workdir, name)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(path, 0o644)
    os.chmod(workdir, 0o700)
    return workdir


@dataclasses.dataclass
class _Streams:
    out: bytearray = dataclasses.field(default_factory=bytearray)
    out_total: int = 0
    channel: bytearray = dataclasses.field(default_factory=bytearray)


def _pump(sel: selectors.BaseSelector, streams: _Streams, limits: iso.SandboxLimits, timeout: float) -> None:
    """Read what is ready on the output / channel pipes; unregister pipes at EOF."""
    for key, _ in sel.select(timeout):
        data = os.read(key.fd, 65536)
        if not data:
            sel.unregister(key.fd)
            continue
        if key.data == "out":
            streams.out_total += len(data)
            room = limits.max_output_bytes - len(streams.out)
            if room > 0:
                streams.out += data[:room]
        elif len(streams.channel) < _CHANNEL_CAP:
            streams.channel += data[: _CHANNEL_CAP - len(streams.channel)]


def _watch(proc: subprocess.Popen, sel: selectors.BaseSelector, streams: _Streams, limits: iso.SandboxLimits) -> tuple[bool, bool]:
    """Pump pipes until they close, the program exits (+grace), the deadline, or output overflow."""
    start = time.monotonic()
    deadline = start + limits.wall_s
    exited_at: float | None = None
    while sel.get_map():
        now = time.monotonic()
        if streams.out_total > limits.max_output_bytes * _HARD_OUTPUT_FACTOR:
            return False, True
        if exited_at is None and proc.poll() is not None:
            exited_at = now
        if exited_at is not None and now - exited_at > _EXIT_GRACE_S:
            return False, False
        if now >= deadline:
            return proc.poll() is None, False
        _pump(sel, streams, limits, min(deadline - now, 0.05))
    return False, False


def _kill_everything(proc: subprocess.Popen, uid: int | None) -> bool:
    """Kill the program's whole tree; True when nothing of it is left (zombies reaped)."""
    iso.kill_group(proc.pid)
    reap = iso.reap_children if REAP_ALL_CHILDREN else None
    gone = iso.sweep_uid(uid, reap=reap) if uid is not None else True
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - a stuck uninterruptible child
        gone = False
    if reap is not None:
        reap()
    return gone


def run_python(
    files: dict[str, str], script: str, args: list[str], stdin: bytes, limits: iso.SandboxLimits
) -> SandboxOutcome:
    """Run `python SCRIPT ARGS...` among `files` in a fresh sandbox. `{channel_fd}` in args is replaced."""
    with iso.LEASE.run_lock:
        workdir = _prepare_workdir(files)
        chan_r, chan_w = os.pipe()
        try:
            plan, report = _isolation_plan(workdir, limits)
            if plan.uid is not None:
                os.chown(workdir, plan.uid, plan.uid)
                for name in files:
                    os.chown(os.path.join(workdir, name), plan.uid, plan.uid)
                iso.sweep_uid(plan.uid)  # leftovers of a predecessor that died mid-run
            home = "/tmp" if plan.mounts else workdir
            argv = [_interpreter(bool(plan.mounts)), "-I", "-S", "-B", script] + \
                [a.replace("{channel_fd}", str(chan_w)) for a in args]
            return _run(argv, workdir, plan, report, _minimal_env(home), stdin, (chan_r, chan_w))
        finally:
            for fd in (chan_r, chan_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
            shutil.rmtree(workdir, ignore_errors=True)


def _run(argv, workdir, plan, report, env, stdin: bytes, chan: tuple[int, int]) -> SandboxOutcome:
    chan_r, chan_w = chan
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        pass_fds=(chan_w,), preexec_fn=iso.make_preexec(plan), close_fds=True,
    )
    os.close(chan_w)
    streams = _Streams()
    sel = selectors.DefaultSelector()
    try:
        try:
            proc.stdin.write(stdin)
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        sel.register(proc.stdout.fileno(), selectors.EVENT_READ, "out")
        sel.register(chan_r, selectors.EVENT_READ, "chan")
        timed_out, exceeded = _watch(proc, sel, streams, plan.limits)
        _kill_everything(proc, plan.uid)
        drain_until = time.monotonic() + 1.0
        while sel.get_map() and time.monotonic() < drain_until:  # the tree is dead: drain to EOF
            _pump(sel, streams, plan.limits, 0.1)
    finally:
        sel.close()
        proc.stdout.close()
    out = bytes(streams.out).decode("utf-8", "replace")
    return SandboxOutcome(
        returncode=proc.returncode, output=out, output_truncated=streams.out_total > len(streams.out),
        output_exceeded=exceeded, channel=bytes(streams.channel), timed_out=timed_out,
        wall_s=time.monotonic() - start, isolation=report,
    )
