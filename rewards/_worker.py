"""A scoring worker process: reads JSON tasks on stdin, writes JSON results on its stdout.

Started by `rewards.batch.ScorerPool` as `python -m rewards._worker`. Single-threaded
(so the code sandbox's fork + pre-exec is safe), a child subreaper (orphans of sandboxed
programs re-parent here and get reaped), and its real stdout is reserved for the protocol:
fd 1 is pointed at stderr so a verifier's prints cannot corrupt it.

Protocol, one JSON object per line:
  parent -> worker {"id": int, "name": str, "completion": str, "reference": {...}, "options": {...}}
  worker -> parent {"hello": pid, "uid": int | null, "work_root": dir} once, then {"id", "score", "info"} per task
                   ("id": null when the task line itself could not be read).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from typing import Any

from rewards.failures import BAD_INPUT, VERIFIER_ERROR


MAX_INFO_DEPTH = 32


def _bounded(value: Any, depth: int = MAX_INFO_DEPTH) -> Any:
    """`value` with containers below `depth` levels replaced by a short repr, so that the
    result line is JSON any reader can load (a tool argument nested 983 deep once made the
    parent's `json.loads` raise RecursionError and took the whole batch down)."""
    if isinstance(value, dict):
        return {str(k): _bounded(v, depth - 1) for k, v in value.items()} if depth > 0 else repr(value)[:200]
    if isinstance(value, (list, tuple)):
        return [_bounded(v, depth - 1) for v in value] if depth > 0 else repr(value)[:200]
    return value


def _line(result: dict) -> str:
    try:
        return json.dumps({**result, "info": _bounded(result["info"])}, default=str)
    except (TypeError, ValueError, RecursionError) as exc:  # pragma: no cover - _bounded should prevent it
        return json.dumps({**result, "info": {"reason": f"{VERIFIER_ERROR}: result not serialisable: {exc}"}})


def _result(task: dict) -> dict:
    from rewards.registry import get_verifier

    try:
        res = get_verifier(task["name"])(task["completion"], task["reference"], **task.get("options", {}))
        return {"id": task["id"], "score": res.score, "info": res.info}
    except Exception as exc:  # a verifier error scores the item 0, never the batch
        reason = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return {"id": task["id"], "score": 0.0, "info": {"reason": f"{VERIFIER_ERROR}: {reason[-1000:]}"}}


def main() -> None:
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    from rewards import sandbox, sandbox_isolation

    sandbox.IN_WORKER = True
    sandbox.WORK_ROOT = os.environ.get(sandbox.WORK_ROOT_ENV) or tempfile.mkdtemp(prefix="polymath-sbxw-")
    os.chmod(sandbox.WORK_ROOT, 0o711)
    sandbox.REAP_ALL_CHILDREN = sandbox_isolation.become_subreaper()
    uid = None
    if os.geteuid() == 0:
        uid = sandbox_isolation.LEASE.acquire()
    if sandbox.default_mode() == "isolated":
        sandbox_isolation.probe()  # once, before the first item's clock starts
    proto.write(json.dumps({"hello": os.getpid(), "uid": uid, "work_root": sandbox.WORK_ROOT}) + "\n")
    try:
        for line in sys.stdin:
            try:
                task = json.loads(line)
            except (ValueError, RecursionError) as exc:  # answered as the item the parent sent
                proto.write(json.dumps({"id": None, "score": 0.0, "info": {"reason": f"{BAD_INPUT}: {exc}"}}) + "\n")
                continue
            proto.write(_line(_result(task)) + "\n")
    finally:
        try:
            os.rmdir(sandbox.WORK_ROOT)
        except OSError:
            pass  # the pool deletes it (and whatever is in it) when it closes


if __name__ == "__main__":
    main()
