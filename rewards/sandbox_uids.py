"""The code sandbox's throwaway uids: a machine-unique lease per process, and sweeps.

When the scorer runs as root, each scoring worker leases a uid above 2**20 (an flock on
`LEASE_DIR/<uid>`, so concurrent workers never share one) and its sandboxed programs run
under it. `sweep_uid` kills every process whose real, effective or saved uid is the
leased one (a setuid binary keeps the sandbox uid as its real uid), by `kill(-1)` from a
helper running as that uid plus a direct kill of each match; the pool sweeps a worker's
uid when it has to kill the worker. Inside one run the PID namespace already does this.
"""

from __future__ import annotations

import fcntl
import os
import random
import signal
import threading
import time

UID_BASE = 1 << 20
UID_SPAN = 1 << 16
LEASE_DIR = "/tmp/polymath-sandbox-uids"


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


def _real_uids(pid: str) -> tuple[int, ...]:
    """(real, effective, saved, fs) uids of a live, non-zombie process; () if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            text = fh.read()
    except OSError:
        return ()
    state = uids = None
    for line in text.splitlines():
        if line.startswith(b"State:"):
            state = line.split()[1:2]
        elif line.startswith(b"Uid:"):
            uids = tuple(int(x) for x in line.split()[1:5])
            break
    if uids is None or state == [b"Z"]:
        return ()
    return uids


def uid_pids(uid: int) -> list[int]:
    """Live (non-zombie) processes with `uid` as real, effective or saved uid (a setuid
    binary the sandbox started keeps the sandbox uid as its real uid)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit() and uid in _real_uids(name)[:3]:
            pids.append(int(name))
    return pids


def _kill_all_as(uid: int) -> None:
    """kill(-1, SIGKILL) from a forked helper whose real uid is `uid`: the kernel lets it
    signal every process whose real or saved uid is `uid` (setuid ones included)."""
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
    """Kill every process of `uid` (real, effective or saved). True if none is left."""
    for _ in range(rounds):
        pids = uid_pids(uid)
        if not pids:
            return True
        _kill_all_as(uid)
        for p in pids:  # a process whose only the effective uid matches (kill(-1) misses it)
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        if reap is not None:
            reap()
        time.sleep(0.002)
    return not uid_pids(uid)


def become_subreaper() -> bool:
    """Make orphaned sandbox descendants re-parent to this process (so it can reap them)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER


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
