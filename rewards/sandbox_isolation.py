"""Kernel-level isolation for the code sandbox: namespaces, limits, a throwaway uid.

What a sandboxed program gets (each piece is probed once per process; what the kernel
refuses is reported in the result's `isolation` dict instead of failing the run):
- its own session / process group (`setsid`), so the whole tree can be signalled;
- `unshare(CLONE_NEWNET)`: a network namespace with only a downed loopback, so every
  connection fails. Python 3.11 has no `os.unshare`, hence ctypes `libc.unshare`.
  Where refused (no CAP_SYS_ADMIN, e.g. an unprivileged container):
  `network="unavailable"` and the program CAN reach the network.
- `unshare(CLONE_NEWNS)`: a private mount namespace in which the fresh working directory
  is bind-mounted over /tmp, /var/tmp and /dev/shm (the only world-writable places), so
  "temporary" files land in the working directory and are deleted with it. A parent
  directory of the Python installation that others cannot traverse (e.g. /root, mode
  0700, where pyenv lives) is covered by a tmpfs holding only a bind of the
  installation, which also hides the rest of that directory. Where refused:
  `filesystem="unavailable"`.
- a dedicated unprivileged uid/gid (when the scorer runs as root): leased per process
  from a range above 2**20 with an flock, so concurrent sandboxes never share one.
  Under it RLIMIT_NPROC binds (it does not bind root), writes outside the working
  directory fail (EACCES), other processes cannot be signalled, and every process it
  left behind (including ones that called `setsid` to escape the process group) is
  killed afterwards by `kill(-1, SIGKILL)` from a helper running as that uid.
  When not root: `uid="unavailable"`, the program runs as the caller's uid and only its
  process group is killed (a program that calls `setsid` can then outlive it).
- rlimits: CPU seconds, address space, process count, file size, open files; core 0.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import os
import random
import resource
import signal
import stat
import sys
import threading
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
UID_BASE = 1 << 20
UID_SPAN = 1 << 16
LEASE_DIR = "/tmp/polymath-sandbox-uids"
WRITABLE_MOUNTS = ("/tmp", "/var/tmp", "/dev/shm")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one sandboxed program (all enforced by the kernel but wall_s)."""

    wall_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 1 << 30
    max_processes: int = 32
    max_file_bytes: int = 16 << 20
    max_open_files: int = 64
    max_output_bytes: int = 64 << 10

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"SandboxLimits.{f.name} must be > 0, got {getattr(self, f.name)!r}")


@dataclasses.dataclass(frozen=True)
class IsolationPlan:
    """What the child's pre-exec step does; built in the parent from the probe."""

    workdir: str
    uid: int | None
    network: bool
    mounts: bool
    masks: tuple[tuple[str, str], ...]  # (inaccessible ancestor, installation dir inside it)
    limits: SandboxLimits


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    data_p = ctypes.c_char_p(enc(data)) if data else None
    _check(_libc.mount(enc(src), enc(target), enc(fstype), flags, data_p), f"mount {target}")


def python_masks() -> tuple[tuple[str, str], ...]:
    """(ancestor, install_dir) pairs: ancestors others cannot traverse that hide the interpreter."""
    masks = []
    for path in {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}:
        parts = path.split(os.sep)
        for i in range(2, len(parts) + 1):
            anc = os.sep.join(parts[:i]) or os.sep
            if not os.stat(anc).st_mode & stat.S_IXOTH:
                masks.append((anc, path))
                break
    return tuple(sorted(set(masks)))


def _apply_masks(masks: tuple[tuple[str, str], ...]) -> None:
    for anc, install in masks:
        fd = os.open(install, os.O_PATH | os.O_DIRECTORY)
        _mount("tmpfs", anc, "tmpfs", 0, "mode=0755,size=1m")
        target = os.path.join(anc, os.path.relpath(install, anc))
        os.makedirs(target, mode=0o755, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
        os.close(fd)


def _set_limits(lim: SandboxLimits) -> None:
    cpu = int(lim.cpu_s)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (lim.memory_bytes, lim.memory_bytes))
    resource.setrlimit(resource.RLIMIT_NPROC, (lim.max_processes, lim.max_processes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim.max_file_bytes, lim.max_file_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (lim.max_open_files, lim.max_open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def make_preexec(plan: IsolationPlan):
    """The function run in the forked child before exec (runs as root until setuid)."""

    def preexec() -> None:
        os.setsid()
        flags = (CLONE_NEWNET if plan.network else 0) | (CLONE_NEWNS if plan.mounts else 0)
        if flags:
            _check(_libc.unshare(flags), "unshare")
        if plan.mounts:
            _mount(None, "/", None, MS_REC | MS_PRIVATE)
            wd = os.open(plan.workdir, os.O_PATH | os.O_DIRECTORY)  # the path vanishes under /tmp
            for target in WRITABLE_MOUNTS:
                if os.path.isdir(target):
                    _mount(f"/proc/self/fd/{wd}", target, None, MS_BIND)
            os.close(wd)
            _apply_masks(plan.masks)
            os.chdir("/tmp")  # the working directory, under the path the program will see
        _set_limits(plan.limits)
        if plan.uid is not None:
            os.setgroups([])
            os.setgid(plan.uid)
            os.setuid(plan.uid)
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setuid, which clears it

    return preexec


def _probe_child(flags: int, mounts: bool) -> int:
    """Exit status of a forked child trying the namespaces: 0 = all worked."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            if _libc.unshare(flags) == 0:
                code = 0
                if mounts:
                    _mount(None, "/", None, MS_REC | MS_PRIVATE)
                    _apply_masks(python_masks())
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


_probe_cache: dict[int, dict[str, bool]] = {}


def probe() -> dict[str, bool]:
    """Which isolation pieces this kernel and this process's privileges allow (cached)."""
    pid = os.getpid()
    if pid not in _probe_cache:
        root = os.geteuid() == 0
        _probe_cache[pid] = {
            "network": _probe_child(CLONE_NEWNET, False) == 0,
            "filesystem": _probe_child(CLONE_NEWNS, True) == 0,
            "uid": root,
        }
    return _probe_cache[pid]


class UidLease:
    """A machine-unique sandbox uid for this process (flock on a file per uid)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # one sandbox at a time per process (shared uid)
        self._owner_pid: int | None = None
        self._fd: int | None = None
        self.uid: int | None = None

    def acquire(self) -> int:
        if self._owner_pid == os.getpid() and self.uid is not None:
            return self.uid
        os.makedirs(LEASE_DIR, mode=0o700, exist_ok=True)
        rng = random.Random(os.getpid() ^ time.time_ns())
        for _ in range(1000):
            uid = UID_BASE + rng.randrange(UID_SPAN)
            fd = os.open(os.path.join(LEASE_DIR, str(uid)), os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self._fd, self.uid, self._owner_pid = fd, uid, os.getpid()
            return uid
        raise RuntimeError(f"no free sandbox uid in [{UID_BASE}, {UID_BASE + UID_SPAN})")

    @property
    def run_lock(self) -> threading.Lock:
        return self._lock


LEASE = UidLease()


def uid_pids(uid: int) -> list[int]:
    """Live (non-zombie) processes whose /proc entry is owned by `uid`."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/stat", "rb") as fh:
                state = fh.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != b"Z":
            pids.append(int(name))
    return pids


def _kill_all_as(uid: int) -> None:
    """kill(-1, SIGKILL) from a forked helper running as `uid`: hits every process of that uid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            for _ in range(3):
                try:
                    os.kill(-1, signal.SIGKILL)
                except OSError:
                    pass
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def sweep_uid(uid: int, rounds: int = 100, reap=None) -> bool:
    """Kill every process owned by `uid`, even ones that left the process group. True if none left."""
    for _ in range(rounds):
        if not uid_pids(uid):
            return True
        _kill_all_as(uid)
        if reap is not None:
            reap()
        time.sleep(0.002)
    return not uid_pids(uid)


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def become_subreaper() -> bool:
    """Make orphaned sandbox descendants re-parent to this process (so it can reap them)."""
    return _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def reap_children() -> int:
    """Reap every exited child without blocking; the number reaped."""
    n = 0
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return n
        if pid == 0:
            return n
        n += 1


__all__ = [
    "SandboxLimits",
    "IsolationPlan",
    "make_preexec",
    "probe",
    "LEASE",
    "sweep_uid",
    "uid_pids",
    "kill_group",
    "become_subreaper",
    "reap_children",
]
