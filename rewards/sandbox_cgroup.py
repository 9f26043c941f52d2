"""A cgroup per sandboxed program: one memory and process limit for the whole program.

RLIMIT_AS bounds each process, not the program: three processes once held 2.1 GB
under a 1 GiB limit, and at 32 processes the bound is 32 GiB. A cgroup charges every
process of the program (and the tmpfs pages it writes) to one `memory` limit and
counts them under one `pids` limit. `ProgramCgroup.create` makes one, named after the
scoring worker's pid, under the scorer's own cgroup:
- cgroup v2 (one unified hierarchy with the `memory` and `pids` controllers delegated
  to it): `memory.max`, `memory.swap.max = 0`, `pids.max`;
- else cgroup v1 (`memory` and `pids` hierarchies, writable): `memory.limit_in_bytes`
  (and `memory.memsw.limit_in_bytes`, so swap does not extend it), `pids.max`.
Where neither can be written (no root, a read-only /sys/fs/cgroup) it returns None and
the caller falls back to rlimits, saying so (`describe()`). The program's start joins the
cgroup before exec (`join`, in the forked child); `remove` kills whatever is still in it
and deletes it; `sweep_worker(pid)` does that for every cgroup a killed worker left.
"""

from __future__ import annotations

import itertools
import os
import signal
import time

ROOT = "/sys/fs/cgroup"
_PREFIX = "polymath-sbx-"
_counter = itertools.count()


def _own_path(controller: str | None) -> str | None:
    """This process's cgroup path in the v1 `controller` hierarchy (None: the v2 one)."""
    try:
        with open("/proc/self/cgroup") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        if (controller is None and ctrls == "") or (controller is not None and controller in ctrls.split(",")):
            return path
    return None


def _write(path: str, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def _v2_parent() -> str | None:
    rel = _own_path(None)
    for mount in (ROOT, os.path.join(ROOT, "unified")):
        if rel is None or not os.path.exists(os.path.join(mount, "cgroup.controllers")):
            continue
        parent = os.path.join(mount, rel.lstrip("/"))
        try:
            with open(os.path.join(parent, "cgroup.controllers")) as fh:
                available = fh.read().split()
        except OSError:
            continue
        if {"memory", "pids"} <= set(available) and os.access(parent, os.W_OK):
            return parent
    return None


def _v1_parents() -> dict[str, str] | None:
    out = {}
    for ctrl in ("memory", "pids"):
        rel = _own_path(ctrl)
        base = os.path.join(ROOT, ctrl)
        if rel is None or not os.path.exists(os.path.join(base, "cgroup.procs")):
            return None
        parent = os.path.join(base, rel.lstrip("/"))
        if not os.access(parent, os.W_OK):
            return None
        out[ctrl] = parent
    return out


class ProgramCgroup:
    """The cgroup directories of one program run (one for v2, memory + pids for v1)."""

    def __init__(self, version: int, dirs: list[str], memory_bytes: int, max_processes: int) -> None:
        self.version, self.dirs = version, dirs
        self.memory_bytes, self.max_processes = memory_bytes, max_processes

    @classmethod
    def create(cls, memory_bytes: int, max_processes: int) -> "ProgramCgroup | None":
        name = f"{_PREFIX}{os.getpid()}-{next(_counter)}"
        made: list[str] = []
        try:
            parent = _v2_parent()
            if parent is not None:
                try:
                    _write(os.path.join(parent, "cgroup.subtree_control"), "+memory +pids")
                except OSError:
                    pass  # already enabled, or a parent with processes (then mkdir below fails to limit)
                d = os.path.join(parent, name)
                os.mkdir(d)
                made.append(d)
                _write(os.path.join(d, "memory.max"), str(memory_bytes))
                if os.path.exists(os.path.join(d, "memory.swap.max")):
                    _write(os.path.join(d, "memory.swap.max"), "0")
                _write(os.path.join(d, "pids.max"), str(max_processes))
                return cls(2, made, memory_bytes, max_processes)
            parents = _v1_parents()
            if parents is None:
                return None
            for ctrl in ("memory", "pids"):
                d = os.path.join(parents[ctrl], name)
                os.mkdir(d)
                made.append(d)
            mem = made[0]
            _write(os.path.join(mem, "memory.limit_in_bytes"), str(memory_bytes))
            if os.path.exists(os.path.join(mem, "memory.memsw.limit_in_bytes")):
                try:
                    _write(os.path.join(mem, "memory.memsw.limit_in_bytes"), str(memory_bytes))
                except OSError:
                    pass  # swap accounting off: nothing to extend the limit with
            _write(os.path.join(made[1], "pids.max"), str(max_processes))
            return cls(1, made, memory_bytes, max_processes)
        except OSError:
            for d in reversed(made):
                _rmdir(d)
            return None

    def join(self) -> None:
        """Move the calling process into the cgroup (in the child, before exec)."""
        for d in self.dirs:
            _write(os.path.join(d, "cgroup.procs"), str(os.getpid()))

    def oom_killed(self) -> bool:
        """Whether the memory limit killed a process of the program."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            with open(os.path.join(self.dirs[0], name)) as fh:
                for line in fh:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill" and int(value) > 0:
                        return True
        except (OSError, ValueError):
            pass
        return False

    def remove(self) -> None:
        for d in self.dirs:
            _kill_all(d)
            _rmdir(d)

    def describe(self) -> str:
        return f"cgroup v{self.version}: memory {self.memory_bytes} bytes, {self.max_processes} processes, whole program"


def _pids(d: str) -> list[int]:
    try:
        with open(os.path.join(d, "cgroup.procs")) as fh:
            return [int(x) for x in fh.read().split()]
    except (OSError, ValueError):
        return []


def _kill_all(d: str) -> None:
    if os.path.exists(os.path.join(d, "cgroup.kill")):
        try:
            _write(os.path.join(d, "cgroup.kill"), "1")
        except OSError:
            pass
    for _ in range(50):
        pids = _pids(d)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


def _rmdir(d: str) -> None:
    for _ in range(50):
        try:
            os.rmdir(d)
            return
        except FileNotFoundError:
            return
        except OSError:  # EBUSY: a process still exiting
            time.sleep(0.01)


def sweep_worker(worker_pid: int) -> None:
    """Kill and delete every program cgroup that the worker `worker_pid` created."""
    prefix = f"{_PREFIX}{worker_pid}-"
    parents = []
    v2 = _v2_parent()
    if v2:
        parents.append(v2)
    parents += list((_v1_parents() or {}).values())
    for parent in parents:
        try:
            names = [n for n in os.listdir(parent) if n.startswith(prefix)]
        except OSError:
            continue
        for n in names:
            _kill_all(os.path.join(parent, n))
            _rmdir(os.path.join(parent, n))
