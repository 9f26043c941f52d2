"""The code sandbox as bubblewrap (`bwrap`, Debian package `bubblewrap`) runs it, as root.

Why bubblewrap: it is the container runtime Flatpak is built on, small and well kept,
and it builds a root file system from nothing, which the hand-made namespaces before it
did not (they made the host's `/` read-only, so world-readable answer keys, host UNIX
sockets and FIFOs stayed reachable). One run is

    bwrap --unshare-pid/ipc/net/uts/cgroup --die-with-parent --new-session
          --cap-drop ALL --cap-add CAP_SETUID --cap-add CAP_SETGID
          --ro-bind /usr /usr (+ /lib, /lib64, /bin, /sbin as the host has them: links or dirs)
          --ro-bind <the interpreter's installation> (its ancestors as empty 0755 dirs)
          --ro-bind /etc/ld.so.cache --proc /proc --size N --tmpfs /tmp
          --tmpfs /dev (+ null, zero, full, random, urandom; /dev/shm and /var/tmp link to /tmp)
          --clearenv --setenv ... --chdir /tmp --
      setpriv --reuid U --regid U --clear-groups --no-new-privs --
      unshare --user --map-user 1000 --map-group 1000 -- python -I -S -B ...

so the program sees only the system's programs and libraries, its interpreter and an
empty private /tmp (one tmpfs of the disk quota's size, also reached as /dev/shm and
/var/tmp; its pages count in the program's memory cgroup); no host data directory (/work, /home, /root,
/srv, /var, /etc), socket or FIFO exists in its file system. It runs as the worker's
leased throwaway uid U on the host (`sandbox_uids`: RLIMIT_NPROC counts per uid, and the
pool can sweep it) inside a user namespace of its own, which gives it a fresh user and
session keyring (keyrings are per user namespace: keys one item adds are gone for the
next); the forked starter also joins a new anonymous session keyring before exec, so
nothing of the worker's keyring is possessed by the program. Its memory and process
count are limited for the whole program by a cgroup (`sandbox_cgroup`), joined before
exec; where no cgroup can be made, by RLIMIT_AS per process and RLIMIT_NPROC per uid
(said in the outcome's isolation report). bwrap exits with the program's status, or
128 + N when a signal N killed it. Where the kernel refuses a user namespace to an
unprivileged uid (`probe_error` tries), programs run without the `unshare --user` step:
all else holds, but kernel keys of the sandbox uid then persist across a worker's items,
and the isolation report's `keyring` says so.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import sys

KEYCTL_JOIN_SESSION_KEYRING = 1
SYS_KEYCTL = 250 if os.uname().machine == "x86_64" else 219  # x86_64, aarch64
INNER_UID = 1000
_SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BwrapMissing(RuntimeError):
    """bubblewrap (or setpriv / unshare from util-linux) is not installed."""


@functools.lru_cache(maxsize=1)
def tools() -> dict[str, str]:
    """{"bwrap", "setpriv", "unshare"}: their paths; BwrapMissing naming the missing ones."""
    found = {name: shutil.which(name, path="/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin") for name in
             ("bwrap", "setpriv", "unshare")}
    missing = [n for n, p in found.items() if not p]
    if missing:
        raise BwrapMissing(f"{', '.join(missing)} not found: the code sandbox needs bubblewrap and util-linux "
                           "(Debian: `apt-get install -y bubblewrap util-linux`; `make sandbox-deps`)")
    return {n: os.path.realpath(p) for n, p in found.items()}  # type: ignore[misc]


def _install_dirs() -> list[str]:
    """The interpreter's installation directory (`python -I -S` reads nothing of a venv's),
    unless a bound system dir already holds it."""
    out = []
    for p in [os.path.realpath(sys.base_prefix)]:
        if not any(p == d or p.startswith(d + "/") for d in _SYSTEM_DIRS):
            out.append(p)
    return out


_own_userns: dict[int, bool] = {}  # pid -> whether the program gets a user namespace (set by probe_error)


def own_user_namespace() -> bool:
    """Whether programs get a user namespace of their own here (fresh keyrings per item);
    False where the kernel refuses one to an unprivileged uid (then keys of the sandbox uid
    persist across that worker's items, and the isolation report says so)."""
    return _own_userns.get(os.getpid(), True)


def bwrap_argv(argv: list[str], env: dict[str, str], uid: int, disk_bytes: int,
               userns: bool | None = None) -> list[str]:
    """The command line that runs `argv` sandboxed (see the module docstring)."""
    userns = own_user_namespace() if userns is None else userns
    t = tools()
    args = [t["bwrap"], "--unshare-pid", "--unshare-ipc", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--cap-add", "CAP_SETUID",
            "--cap-add", "CAP_SETGID"]
    for d in _SYSTEM_DIRS:
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    made: set[str] = set()
    for inst in _install_dirs():
        parts = inst.strip("/").split("/")
        for i in range(1, len(parts)):
            anc = "/" + "/".join(parts[:i])
            if anc not in made and not any(anc == d or anc.startswith(d + "/") for d in _SYSTEM_DIRS):
                args += ["--perms", "0755", "--dir", anc]
                made.add(anc)
        args += ["--ro-bind", inst, inst]
    if os.path.exists("/etc/ld.so.cache"):
        args += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    args += ["--proc", "/proc", "--size", str(disk_bytes), "--perms", "1777", "--tmpfs", "/tmp",
             "--size", "65536", "--perms", "0755", "--tmpfs", "/dev"]  # /dev: only the devices below
    for dev in ("null", "zero", "full", "random", "urandom"):
        args += ["--dev-bind", f"/dev/{dev}", f"/dev/{dev}"]
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        args += ["--symlink", f"/proc/self/fd/{i}", f"/dev/{name}"]
    # one writable file system, one quota: /dev/shm (POSIX shared memory, semaphores) and /var/tmp are /tmp
    args += ["--symlink", "/proc/self/fd", "/dev/fd", "--symlink", "/tmp", "/dev/shm", "--perms", "0755", "--dir", "/var",
             "--symlink", "/tmp", "/var/tmp", "--chdir", "/tmp", "--clearenv"]
    for k, v in env.items():
        args += ["--setenv", k, v]
    args += ["--", t["setpriv"], f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs", "--"]
    if userns:
        args += [t["unshare"], "--user", f"--map-user={INNER_UID}", f"--map-group={INNER_UID}", "--"]
    return args + list(argv)


def join_new_session_keyring() -> None:
    """Join a new anonymous session keyring (in the forked starter, before exec)."""
    _libc.syscall(SYS_KEYCTL, KEYCTL_JOIN_SESSION_KEYRING, None)


def status_from_bwrap(code: int | None) -> int | None:
    """bwrap's exit status as the program's: 128 + N (a signal N killed it) -> -N."""
    if code is not None and 128 < code < 128 + 65:
        return -(code - 128)
    return code


def probe_error(uid: int) -> str | None:
    """Why a trivial program cannot run in this sandbox here, or None. Tries the full
    sandbox, then one without the program's own user namespace (a kernel that refuses
    unprivileged user namespaces: everything else holds; `own_user_namespace()` says which)."""
    first = _probe(uid, userns=True)
    if first is None:
        _own_userns[os.getpid()] = True
        return None
    if _probe(uid, userns=False) is None:
        _own_userns[os.getpid()] = False
        return None
    return first


def _probe(uid: int, userns: bool) -> str | None:
    import subprocess

    try:
        cmd = bwrap_argv([os.path.realpath(sys.executable), "-I", "-S", "-c",
                          "import os; open('/tmp/x', 'w').close(); assert not os.path.exists('/etc/passwd')"],
                         {"PATH": "/usr/bin:/bin"}, uid, 1 << 20, userns)
    except BwrapMissing as exc:
        return str(exc)
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, env={})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bwrap did not run: {exc}"
    if r.returncode != 0:
        return f"bwrap failed (exit {r.returncode}): {r.stderr.decode('utf-8', 'replace').strip()[-500:]}"
    return None
