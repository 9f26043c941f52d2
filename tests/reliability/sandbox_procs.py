"""Sandbox processes a test left behind, told apart from other users' live sandboxes.

`make test` runs the tiny experiment beside the other tests (pytest-xdist), and its GRPO
and eval stages run sandboxed programs under their own leased uids at the same time. A
process under a sandbox uid is this test's leftover when no live process outside the
sandbox uids owns it: its nearest ancestor with an ordinary uid is PID 1 (an orphan) or a
process of this test. One whose nearest such ancestor is another live process (another
scoring worker) belongs to that worker's sandbox and is not counted.
"""

from __future__ import annotations

import os

import psutil

from rewards.sandbox_isolation import UID_BASE


def _sandboxed(p: psutil.Process) -> bool:
    uids = p.uids()
    return uids.real >= UID_BASE or uids.effective >= UID_BASE


def leftover_sandbox_processes(marker: str | None = None) -> list[str]:
    """'pid uids cmdline' of every non-zombie sandbox-uid process this test owns or orphaned,
    and of any process whose command line holds `marker`."""
    mine = {os.getpid()} | {c.pid for c in psutil.Process().children(recursive=True)}
    left = []
    for p in psutil.process_iter(["uids", "status", "cmdline"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(p.info["cmdline"] or [])
            if marker and marker in cmd:
                left.append(f"{p.pid} {p.info['uids']} {cmd[:80]}")
                continue
            if not _sandboxed(p):
                continue
            owner = p.parent()
            while owner is not None and owner.pid > 1 and _sandboxed(owner):
                owner = owner.parent()
            if owner is None or owner.pid <= 1 or owner.pid in mine:
                left.append(f"{p.pid} {p.info['uids']} {cmd[:80]}")
        except (psutil.Error, TypeError):
            continue
    return left


def child_pids() -> set[int]:
    """The pids of this process's live descendants (take it at a test's start)."""
    return {c.pid for c in psutil.Process().children(recursive=True) if c.is_running()}


def new_children(before: set[int]) -> list[str]:
    """'pid cmdline' of each live, non-zombie descendant of this process that was not in
    `before`: what the test itself started and left running. Descendants from before the test
    are not its own: an earlier test in the same pytest worker may have started
    multiprocessing's resource tracker (any spawn-context pool or queue does), which lives as
    long as its parent by design."""
    left = []
    for c in psutil.Process().children(recursive=True):
        try:
            if c.pid in before or c.status() == psutil.STATUS_ZOMBIE:
                continue
            left.append(f"{c.pid} {' '.join(c.cmdline())[:100]}")
        except psutil.Error:
            continue
    return left
