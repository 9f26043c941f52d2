"""A scoring worker process: reads JSON tasks on stdin, writes JSON results on its stdout.

Started by `rewards.batch.ScorerPool` as `python -m rewards._worker`. Single-threaded
(so the code sandbox's fork + pre-exec is safe), a child subreaper (orphans of sandboxed
programs re-parent here and get reaped), and its real stdout is reserved for the protocol:
fd 1 is pointed at stderr so a verifier's prints cannot corrupt it.

Protocol, one JSON object per line:
  parent -> worker {"id": int, "name": str, "completion": str, "reference": {...}, "options": {...}}
  worker -> parent {"hello": pid, "uid": int | null, "work_root": dir} once, then {"id", "score", "info"} per task.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback


def _result(task: dict) -> dict:
    from rewards.registry import get_verifier

    try:
        res = get_verifier(task["name"])(task["completion"], task["reference"], **task.get("options", {}))
        return {"id": task["id"], "score": res.score, "info": res.info}
    except Exception as exc:  # a verifier error scores the item 0, never the batch
        reason = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return {"id": task["id"], "score": 0.0, "info": {"reason": f"verifier error: {reason[-1000:]}"}}


def main() -> None:
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    from rewards import sandbox, sandbox_isolation

    sandbox.IN_WORKER = True
    sandbox.WORK_ROOT = tempfile.mkdtemp(prefix="polymath-sbxw-")
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
            task = json.loads(line)
            proto.write(json.dumps(_result(task), default=str) + "\n")
    finally:
        os.rmdir(sandbox.WORK_ROOT)


if __name__ == "__main__":
    main()
