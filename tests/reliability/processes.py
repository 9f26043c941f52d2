"""Waiting on a child process in the kill tests: poll a condition until it holds, failing
at once (not at the timeout) when the child has already exited."""

from __future__ import annotations

import subprocess
import time


def wait_for(pred, proc: subprocess.Popen, what: str, timeout: float, *, on_timeout, poll: float = 0.02,
             hint: str = ""):
    """`pred()`'s first truthy value; AssertionError if `proc` exits first, or after
    `on_timeout()` (which kills the child) when `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = pred()
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited ({proc.returncode}) before {what}{hint}")
        time.sleep(poll)
    on_timeout()
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{hint}")
