"""Run one untrusted Python program in a sandboxed child process and collect what it said.

`run_python(args, stdin, limits)` starts `python -I -S -B ARGS...` under the isolation of
`rewards.sandbox_isolation` (namespaces, a private read-only file system with a tmpfs
quota, rlimits, a throwaway uid, PID 1 of its own PID namespace), with a minimal
environment (nothing inherited: no secrets; HOME and TMPDIR are its private /tmp),
stdin fed from `stdin`, stdout+stderr merged and capped, and a "result channel" pipe
at fd 3 that the harness writes to. The wall-clock limit is enforced here: on expiry,
or once the program has exited, its process group is killed (PID 1 of its namespace, or
the supervisor above it), which kills its PID namespace and everything it started.

Fail closed: where the isolation cannot be set up (`probe()`), `run_python` raises
`SandboxUnavailable` naming why, unless `mode="unsafe-local"`, which runs the program as
a plain subprocess of this process (own session, rlimits, no_new_privs, a throwaway
working directory; no namespaces: it can read and write what this process can, reach
the network, and leave processes behind) and says so in the outcome's `isolation`.
`SANDBOX_MODE_ENV` (`POLYMATH_SANDBOX`) sets the default mode for worker processes.

Runs are serialised per process because the process's sandbox uid is shared.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import selectors
import shutil
import signal
import sys
import tempfile
import time

from rewards import sandbox_bwrap as sbw
from rewards import sandbox_cgroup
from rewards import sandbox_isolation as iso

_CHANNEL_CAP = 4 << 20
_HARD_OUTPUT_FACTOR = 16  # output beyond max_output_bytes * this kills the program
_EXIT_GRACE_S = 0.2  # after the main process exits, how long pipes may still drain

# Set by the worker process (rewards._worker): orphans re-parent to it, so it reaps all.
REAP_ALL_CHILDREN = False
# True inside a scoring worker; elsewhere the code verifier hands its run to a worker.
IN_WORKER = False
# Parent of the per-run directories (a worker sets its own, which the pool deletes if it
# has to kill the worker mid-run); None = the system temp directory.
WORK_ROOT: str | None = None


SANDBOX_MODE_ENV = "POLYMATH_SANDBOX"
WORK_ROOT_ENV = "POLYMATH_SANDBOX_WORK_ROOT"  # set by the pool for its workers (rewards.batch)
MODES = ("isolated", "unsafe-local")


def default_mode() -> str:
    mode = os.environ.get(SANDBOX_MODE_ENV, "") or "isolated"
    if mode not in MODES:
        raise ValueError(f"{SANDBOX_MODE_ENV}={mode!r}: the code sandbox mode must be one of {MODES}")
    return mode


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
    memory_exceeded: bool = False  # the whole program's memory limit (its cgroup) killed a process


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


@dataclasses.dataclass
class _Streams:
    out: bytearray = dataclasses.field(default_factory=bytearray)
    out_total: int = 0
    channel: bytearray = dataclasses.field(default_factory=bytearray)
    stdin: memoryview | None = None


def _pump(sel: selectors.BaseSelector, streams: _Streams, limits: iso.SandboxLimits, timeout: float) -> None:
    """Feed stdin / read the output and channel pipes that are ready; unregister at EOF."""
    for key, _ in sel.select(timeout):
        if key.data == "in":
            try:
                n = os.write(key.fd, streams.stdin[:65536])
            except (BrokenPipeError, OSError):
                n = len(streams.stdin)
            streams.stdin = streams.stdin[n:]
            if not len(streams.stdin):
                sel.unregister(key.fd)
                os.close(key.fd)
            continue
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


class _Child:
    """The started process (the supervisor when isolated): poll / wait / returncode."""

    def __init__(self, pid: int) -> None:
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -9
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int | None:
        end = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < end:
            time.sleep(0.001)
        return self.returncode


def _watch(proc: _Child, sel: selectors.BaseSelector, streams: _Streams, limits: iso.SandboxLimits) -> tuple[bool, bool]:
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


def run_python(args: list[str], stdin: bytes, limits: iso.SandboxLimits, mode: str | None = None) -> SandboxOutcome:
    """Run `python -I -S -B ARGS...` sandboxed; its fd 3 is the result channel."""
    mode = mode or default_mode()
    if mode not in MODES:
        raise ValueError(f"sandbox mode must be one of {MODES}, got {mode!r}")
    exe = os.path.realpath(sys.executable)
    argv = [exe, "-I", "-S", "-B"] + list(args)
    with iso.LEASE.run_lock:
        if mode == "unsafe-local":
            return _run_unsafe_local(argv, stdin, limits)
        caps = iso.probe()
        if not caps["available"]:
            raise iso.SandboxUnavailable(
                f"code sandbox unavailable ({caps['error']}); programs are not run. To run them without "
                f"isolation on this machine, set `sandbox: unsafe-local` (or {SANDBOX_MODE_ENV}=unsafe-local)")
        if os.geteuid() == 0:
            return _run_bwrap(argv, stdin, limits)
        plan = iso.IsolationPlan(uid=None, masks=(), limits=limits)
        report = {"mode": "isolated", "network": "namespace", "filesystem": "namespace", "ipc": "namespace",
                  "pid": "namespace", "uid": "user-namespace", "keyring": "user namespace",
                  "memory": f"RLIMIT_AS {limits.memory_bytes} bytes per process, RLIMIT_NPROC {limits.max_processes}"}
        return _run(lambda fds: iso.spawn(argv, _minimal_env("/tmp"), plan, fds), stdin, limits, report)


def _run_bwrap(argv: list[str], stdin: bytes, limits: iso.SandboxLimits) -> SandboxOutcome:
    """As root: bubblewrap (`rewards.sandbox_bwrap`) under the leased uid, in a cgroup of its own."""
    uid = iso.LEASE.acquire()
    cmd = sbw.bwrap_argv(argv, _minimal_env("/tmp"), uid, limits.max_disk_bytes)
    cg = sandbox_cgroup.ProgramCgroup.create(limits.memory_bytes, limits.max_processes)

    def start(fds: list[int]) -> int:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            try:
                os.setsid()
                iso._libc.prctl(iso.PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                if cg is not None:
                    cg.join()
                sbw.join_new_session_keyring()
                for target, fd in enumerate([fcntl.fcntl(f, fcntl.F_DUPFD, 100) for f in fds]):
                    os.dup2(fd, target, inheritable=True)
                os.closerange(len(fds), 1 << 16)
                iso._set_limits(limits)
                os.execve(cmd[0], cmd, {})
            finally:
                os._exit(127)
        return pid

    memory = cg.describe() if cg is not None else (
        f"no cgroup here: RLIMIT_AS {limits.memory_bytes} bytes per process, RLIMIT_NPROC {limits.max_processes} "
        f"for the sandbox uid (a whole program may hold up to {limits.max_processes} x that)")
    report = {"mode": "isolated", "network": "namespace", "filesystem": "bubblewrap", "ipc": "namespace",
              "pid": "namespace", "uid": str(uid), "memory": memory,
              "keyring": "user namespace" if sbw.own_user_namespace() else
              "shared by this worker's items (the kernel refuses an unprivileged user namespace)"}
    try:
        out = _run(start, stdin, limits, report)
        out.memory_exceeded = cg is not None and cg.oom_killed()
    finally:
        if cg is not None:
            cg.remove()
    out.returncode = sbw.status_from_bwrap(out.returncode)
    return out


def _run_unsafe_local(argv: list[str], stdin: bytes, limits: iso.SandboxLimits) -> SandboxOutcome:
    workdir = tempfile.mkdtemp(prefix="polymath-sbx-", dir=WORK_ROOT)
    os.chmod(workdir, 0o700)

    def start(fds: list[int]) -> int:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            try:
                os.setsid()
                for target, fd in enumerate([fcntl.fcntl(f, fcntl.F_DUPFD, 100) for f in fds]):
                    os.dup2(fd, target, inheritable=True)
                os.closerange(len(fds), 1 << 16)
                os.chdir(workdir)
                iso._set_limits(limits)
                iso.set_no_new_privs()
                os.execve(argv[0], argv, _minimal_env(workdir))
            finally:
                os._exit(127)
        return pid

    report = {"mode": "unsafe-local", "network": "unavailable", "filesystem": "unavailable", "ipc": "unavailable",
              "pid": "unavailable", "uid": "unavailable"}
    try:
        return _run(start, stdin, limits, report)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(start, stdin: bytes, limits: iso.SandboxLimits, report: dict[str, str]) -> SandboxOutcome:
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    ch_r, ch_w = os.pipe()
    t0 = time.monotonic()
    try:
        pid = start([in_r, out_w, out_w, ch_w])
    except BaseException:
        for fd in (in_r, in_w, out_r, out_w, ch_r, ch_w):
            os.close(fd)
        raise
    for fd in (in_r, out_w, ch_w):
        os.close(fd)
    proc = _Child(pid)
    streams = _Streams(stdin=memoryview(stdin))
    sel = selectors.DefaultSelector()
    try:
        os.set_blocking(in_w, False)
        if len(stdin):
            sel.register(in_w, selectors.EVENT_WRITE, "in")
        else:
            os.close(in_w)
        sel.register(out_r, selectors.EVENT_READ, "out")
        sel.register(ch_r, selectors.EVENT_READ, "chan")
        timed_out, exceeded = _watch(proc, sel, streams, limits)
        if not (timed_out or exceeded):  # its pipes closed: let it report how it ended
            proc.wait(_EXIT_GRACE_S)
        iso.kill_group(pid)  # the supervisor and PID 1: the PID namespace dies with it
        proc.wait(5)
        if proc.returncode is None:  # pragma: no cover - a stuck uninterruptible child
            iso.kill_group(pid)
            proc.wait(5)
        if REAP_ALL_CHILDREN:
            iso.reap_children()
        drain_until = time.monotonic() + 1.0
        while sel.get_map() and time.monotonic() < drain_until:  # the tree is dead: drain to EOF
            _pump(sel, streams, limits, 0.1)
    finally:
        for key in list(sel.get_map().values()):
            if key.data == "in":
                os.close(key.fd)
        sel.close()
        os.close(out_r)
        os.close(ch_r)
    out = bytes(streams.out).decode("utf-8", "replace")
    return SandboxOutcome(
        returncode=proc.returncode, output=out, output_truncated=streams.out_total > len(streams.out),
        output_exceeded=exceeded, channel=bytes(streams.channel), timed_out=timed_out,
        wall_s=time.monotonic() - t0, isolation=report,
    )
