"""Kernel-level isolation for the code sandbox: namespaces, limits, a throwaway uid.

`spawn` starts a sandboxed program in two forks. The first child ("supervisor") calls
`setsid` and unshares a new mount, network, IPC and PID namespace (plus a user
namespace when not root); the second child is PID 1 of the new PID namespace and
becomes the program. When it dies the kernel kills everything else in that namespace,
so nothing the program starts (`setsid`, double forks, setuid binaries) outlives it;
the supervisor only waits for it and exits with its status, and both carry
`PR_SET_PDEATHSIG`, so killing the supervisor's process group (or the worker dying)
kills the namespace. Before exec, the program process:
- makes every mount private and recursively read-only (`mount_setattr`), then mounts a
  fresh tmpfs (size = `SandboxLimits.max_disk_bytes`: the total disk quota) on /tmp and
  binds it over every other world-writable directory (/var/tmp, /dev/shm, /run/lock,
  /dev/mqueue, ...): nothing it writes reaches the host, and all of it vanishes with
  the namespace; a fresh /proc shows only its own processes;
- has its own IPC namespace (SysV shared memory, semaphores, message queues and POSIX
  queues die with it) and its own network namespace (only a downed loopback);
- as root: hides the Python installation's inaccessible ancestors (e.g. /root) behind a
  tmpfs holding only the installation, then switches to a dedicated unprivileged uid
  leased per worker process (above 2**20); not root: a user namespace maps the caller to
  root for the set-up, then a nested one drops to an unprivileged uid whose exec clears
  every capability, so the program cannot undo the mounts;
- sets `PR_SET_NO_NEW_PRIVS` (setuid binaries gain nothing), rlimits (CPU, address
  space, processes, file size, open files, no core) and a minimal environment.
`probe()` starts one trivial program this way once per process: where any step fails the
sandbox is unavailable, and the code verifier refuses to score (fail closed) unless the
caller asked for `unsafe-local`, which runs programs as plain subprocesses on the host.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import os
import resource
import select
import signal
import stat
import sys
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (new syscall table)
USERNS_UID = 1000  # the program's uid inside its user namespace when the scorer is not root
# Covered by the sandbox's own tmpfs (those that exist as real directories); every other
# host path is read-only inside the sandbox.
WRITABLE_MOUNTS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/run/shm", "/dev/mqueue", "/var/crash")
_SETUP_TIMEOUT_S = 20.0

from rewards.sandbox_uids import (  # noqa: E402  (re-exported: the sandbox's uid half)
    LEASE, LEASE_DIR, UID_BASE, UID_SPAN, UidLease, become_subreaper, reap_children, sweep_uid, uid_pids,
)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


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
    max_disk_bytes: int = 64 << 20  # the sandbox's whole writable space (one tmpfs)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"SandboxLimits.{f.name} must be > 0, got {getattr(self, f.name)!r}")


@dataclasses.dataclass(frozen=True)
class IsolationPlan:
    """What the sandbox's set-up does; built in the parent."""

    uid: int | None  # the sandbox uid when root; None: a user namespace does the switch
    masks: tuple[tuple[str, str], ...]  # (inaccessible ancestor, installation dir inside it)
    limits: SandboxLimits


class SandboxUnavailable(RuntimeError):
    """The kernel or the process's privileges refuse part of the isolation."""


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    data_p = ctypes.c_char_p(enc(data)) if data else None
    _check(_libc.mount(enc(src), enc(target), enc(fstype), flags, data_p), f"mount {target}")


def _readonly_everything() -> None:
    attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    ret = _libc.syscall(SYS_MOUNT_SETATTR, ctypes.c_int(-100), ctypes.c_char_p(b"/"), ctypes.c_uint(AT_RECURSIVE),
                        ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    _check(0 if ret == 0 else -1, "mount_setattr / read-only")


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


def _private_writable(lim: SandboxLimits) -> None:
    """A fresh tmpfs (the disk quota) on /tmp, bound over every other world-writable dir."""
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={max(lim.max_disk_bytes // 1024, 64)}k,nr_inodes=16384,mode=1777")
    for target in WRITABLE_MOUNTS[1:]:
        if os.path.isdir(target) and not os.path.islink(target):
            _mount("/tmp", target, None, MS_BIND)


def _set_limits(lim: SandboxLimits) -> None:
    cpu = int(lim.cpu_s)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (lim.memory_bytes, lim.memory_bytes))
    resource.setrlimit(resource.RLIMIT_NPROC, (lim.max_processes, lim.max_processes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim.max_file_bytes, lim.max_file_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (lim.max_open_files, lim.max_open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def set_no_new_privs() -> None:
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _enter_user_namespace(outer_uid: int, outer_gid: int, inner: int, flags: int) -> None:
    _check(_libc.unshare(CLONE_NEWUSER | flags), "unshare(user namespace)")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{inner} {outer_uid} 1\n")
    _write("/proc/self/gid_map", f"{inner} {outer_gid} 1\n")


def _move_fds(fds: list[int], keep: int) -> int:
    """Put `fds` at 0, 1, 2, ... (inheritable), close everything else but `keep`; keep's new fd."""
    keep = fcntl.fcntl(keep, fcntl.F_DUPFD_CLOEXEC, 100)
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
    for target, fd in enumerate(high):
        os.dup2(fd, target, inheritable=True)
    os.closerange(len(fds), keep)
    os.closerange(keep + 1, 1 << 16)
    return keep


def _program(argv: list[str], env: dict[str, str], plan: IsolationPlan, fds: list[int], err: int) -> None:
    """PID 1 of the new namespaces: finish the isolation, then exec (never returns)."""
    err = _move_fds(fds, err)
    try:
        _isolate_and_exec(argv, env, plan)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, then exit
        try:
            os.write(err, f"sandbox set-up failed: {type(exc).__name__}: {exc}".encode()[:2000])
        finally:
            os._exit(127)


def _isolate_and_exec(argv: list[str], env: dict[str, str], plan: IsolationPlan) -> None:
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _apply_masks(plan.masks)
    _readonly_everything()
    _private_writable(plan.limits)
    try:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # only its own processes
    except OSError:
        pass  # a container may forbid a fresh procfs; the host's stays (read-only)
    os.chdir("/tmp")
    _set_limits(plan.limits)
    if plan.uid is not None:
        os.setgroups([])
        os.setgid(plan.uid)
        os.setuid(plan.uid)
    else:  # drop the user namespace's capabilities for good: an exec as a non-zero uid
        _enter_user_namespace(0, 0, USERNS_UID, 0)
        os.setgid(USERNS_UID)
        os.setuid(USERNS_UID)
    set_no_new_privs()
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setuid, which clears it
    os.execve(argv[0], argv, env)


def _supervise(argv, env, plan: IsolationPlan, fds: list[int], err: int) -> None:
    """The first child: new namespaces, fork PID 1, wait for it, exit as it did (never returns)."""
    os.setsid()
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWPID
    if plan.uid is None:
        _enter_user_namespace(os.getuid(), os.getgid(), 0, flags)
    else:
        _check(_libc.unshare(flags), "unshare(mount, network, IPC, PID namespaces)")
    pid = os.fork()
    if pid == 0:
        _program(argv, env, plan, fds, err)
        os._exit(127)  # pragma: no cover - _program never returns
    os.closerange(0, 1 << 16)  # the supervisor keeps no pipe of the program open
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            os._exit(127)
        except InterruptedError:  # pragma: no cover
            continue
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 127)


_own_pid_ns: dict[int, int] = {}


def _fork_into_new_pid_namespace() -> int:
    """fork() with the child as PID 1 of a new PID namespace (one fork, no supervisor):
    unshare(CLONE_NEWPID) only changes where this process's next child goes, so the
    parent points it back at its own namespace right after (setns), for other forks."""
    me = os.getpid()
    if me not in _own_pid_ns:
        _own_pid_ns[me] = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    _check(_libc.unshare(CLONE_NEWPID), "unshare(PID namespace)")
    try:
        pid = os.fork()
    finally:
        if os.getpid() == me:
            _check(_libc.setns(_own_pid_ns[me], CLONE_NEWPID), "setns(own PID namespace)")
    return pid


def spawn(argv: list[str], env: dict[str, str], plan: IsolationPlan, fds: list[int]) -> int:
    """Start `argv` sandboxed with `fds` as its 0, 1, 2, ...; the supervisor's pid (also its
    process group). Raises SandboxUnavailable (after cleaning up) when the set-up fails."""
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    if plan.uid is not None:  # root: the child itself is PID 1 of a fresh PID namespace
        pid = _fork_into_new_pid_namespace()
    else:
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(err_r)
            if plan.uid is not None:
                os.setsid()
                _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC), "unshare(mount, network, IPC namespaces)")
                _program(argv, env, plan, fds, err_w)
            _supervise(argv, env, plan, fds, err_w)
        except BaseException as exc:  # noqa: BLE001
            try:
                os.write(err_w, f"sandbox set-up failed: {type(exc).__name__}: {exc}".encode()[:2000])
            except OSError:
                pass
        os._exit(127)
    os.close(err_w)
    try:
        msg = b""
        deadline = time.monotonic() + _SETUP_TIMEOUT_S
        while True:  # EOF once the program exec'd (close-on-exec) or the set-up failed
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([err_r], [], [], left)[0]:
                msg = b"sandbox set-up failed: timed out"
                break
            chunk = os.read(err_r, 4096)
            if not chunk:
                break
            msg += chunk
    finally:
        os.close(err_r)
    if msg:
        kill_group(pid)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:  # pragma: no cover
            pass
        raise SandboxUnavailable(msg.decode("utf-8", "replace"))
    return pid


_probe_cache: dict[int, dict[str, object]] = {}


def probe() -> dict[str, object]:
    """Whether the full sandbox works in this process (one trivial program run; cached).

    Keys: `available` (bool), `error` (why not, or None), and per piece `network`,
    `filesystem`, `ipc`, `pid`, `uid` (bools, all equal to `available`: the pieces are
    set up together and none is optional)."""
    pid = os.getpid()
    if pid not in _probe_cache:
        error = _probe_error()
        for _ in range(2):  # a transient failure (EAGAIN from fork on a loaded machine) is not a verdict
            if error is None:
                break
            time.sleep(0.2)
            error = _probe_error()
        ok = error is None
        _probe_cache[pid] = {"available": ok, "error": error, "network": ok, "filesystem": ok, "ipc": ok,
                             "pid": ok, "uid": ok, "mode": "root" if os.geteuid() == 0 else "user-namespace"}
    return _probe_cache[pid]


def _probe_error() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"the code sandbox needs Linux namespaces, this is {sys.platform}"
    exe = os.path.realpath(sys.executable)
    for top in WRITABLE_MOUNTS:
        if exe.startswith(top.rstrip("/") + "/"):
            return (f"the Python interpreter {exe} lies under {top}, which the sandbox replaces with its own "
                    "empty tmpfs; use a Python installed elsewhere")
    if os.geteuid() == 0:  # as root the sandbox is bubblewrap (rewards.sandbox_bwrap)
        from rewards.sandbox_bwrap import probe_error

        return probe_error(LEASE.acquire())
    uid = None
    plan = IsolationPlan(uid=uid, masks=(), limits=SandboxLimits())
    null = os.open(os.devnull, os.O_RDWR)
    try:
        child = spawn([exe, "-I", "-S", "-c", "import os; os.listdir('/tmp'); open('/tmp/x', 'w').close()"],
                      {"PATH": "/usr/bin:/bin"}, plan, [null, null, null])
    except (SandboxUnavailable, OSError) as exc:
        return str(exc)
    finally:
        os.close(null)
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    return None if code == 0 else f"a trivial sandboxed program exited with {code}"


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


__all__ = [
    "SandboxLimits",
    "IsolationPlan",
    "SandboxUnavailable",
    "spawn",
    "probe",
    "LEASE",
    "sweep_uid",
    "uid_pids",
    "kill_group",
    "become_subreaper",
    "reap_children",
    "set_no_new_privs",
]
