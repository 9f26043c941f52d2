"""A scoring worker (the process that runs verifiers for RL rollouts) SIGKILLed in the
middle of an item: that item scores 0 with the worker's exit status as the reason, the
rest of the batch is scored by a fresh worker, and the batch returns long before the
per-item timeout (the death is noticed, not waited out)."""

from __future__ import annotations

import threading
import time

import psutil

from rewards import ScorerPool

REF = {"tests": ["assert sq(3) == 9"]}
SLOW = "import time\ntime.sleep(25)\ndef sq(x):\n    return x * x\n"
HONEST = "def sq(x):\n    return x * x\n"
TIMEOUT_S = 60.0


def _workers() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=False)
            if "rewards._worker" in " ".join(p.cmdline())]


def test_scoring_worker_killed_mid_item(fault_log):
    with ScorerPool(num_workers=1, timeout_s=TIMEOUT_S) as pool:
        box: dict = {}
        t0 = time.monotonic()
        th = threading.Thread(target=lambda: box.update(r=pool.score("code", [SLOW, HONEST], [REF, REF])),
                              daemon=True)
        th.start()
        deadline = time.monotonic() + 30
        while not _workers() and time.monotonic() < deadline:
            time.sleep(0.05)
        victims = _workers()
        assert victims, "no scoring worker started"
        time.sleep(2.0)  # the worker has the slow item by now (it runs for 25 s)
        for v in victims:
            v.kill()
        th.join(TIMEOUT_S)
        seconds = time.monotonic() - t0
    assert not th.is_alive(), "score() did not return after its worker was killed"
    slow, honest = box["r"]
    assert slow.score == 0.0 and slow.info.get("reason"), slow
    assert honest.score == 1.0, honest
    assert seconds < TIMEOUT_S / 2, f"the dead worker was waited out ({seconds:.1f}s)"
    fault_log("SIGKILL of a scoring worker mid-item", "detected")
    print(f"slow item: {slow.info['reason'][:120]!r}; batch done in {seconds:.1f}s")
