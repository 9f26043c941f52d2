"""A stage's progress as a small file the runner reads: `<out dir>/progress.json`.

`{"step", "total", "unit", "rate", "eta_s", "updated", "pid"}`, rewritten atomically at most
every `every_s` seconds (and at the last step). The rate is measured from this object's
creation when the first update is step 0 or 1 (a fresh start: a one-step stage still gets
a rate), else from the first update, so a resumed stage does not count the steps it skipped.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from engine.atomic import atomic_write_json

FILENAME = "progress.json"


class ProgressFile:
    def __init__(self, out_dir: str | os.PathLike, total: int | None, unit: str = "step", every_s: float = 2.0):
        self.path = Path(out_dir) / FILENAME
        self.total, self.unit, self.every_s = total, unit, every_s
        self._first: tuple[int, float] | None = None
        self._created = time.time()
        self._written = 0.0

    def update(self, done: int) -> None:
        now = time.time()
        if self._first is None:  # a fresh start counts from here; a resumed one from its first update
            self._first = (0, self._created) if done <= 1 else (done, now)
        last = self.total is not None and done >= self.total
        if now - self._written < self.every_s and not last and self._written:
            return
        d0, t0 = self._first
        rate = (done - d0) / (now - t0) if done > d0 and now > t0 else None
        eta = (self.total - done) / rate if rate and self.total is not None else None
        atomic_write_json(self.path, {"step": done, "total": self.total, "unit": self.unit, "rate": rate,
                                      "eta_s": eta, "updated": now, "pid": os.getpid()})
        self._written = now


def read_progress(path: str | os.PathLike) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
