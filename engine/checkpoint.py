"""Stage checkpoints: `step-N/` directories under one root, `latest` naming the newest.

A checkpoint is written by the trainer into a temporary directory (`.step-N.tmp`), then
renamed to `step-N`, then `latest` is rewritten atomically: a reader following `latest`
only ever finds a complete checkpoint, and a process killed at any point leaves at worst
a temporary directory that the next run removes. Each `step-N/` is an HF model directory
(safetensors + config + tokenizer, so `AutoModelForCausalLM.from_pretrained(step-N)`
works) plus the trainer's optimizer/scheduler/RNG state and the driver's `extra_state`
(data position). Only the newest `keep_last` checkpoints are kept.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from engine.atomic import atomic_write_text

_STEP = re.compile(r"^step-(\d+)$")


class CheckpointManager:
    def __init__(self, root: str | os.PathLike, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"CheckpointManager: keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".step-*.tmp"):  # left by a killed writer
            shutil.rmtree(stale, ignore_errors=True)

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        found = (_STEP.match(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def path(self, step: int) -> Path:
        return self.root / f"step-{step}"

    def latest(self) -> Path | None:
        """The checkpoint `latest` names; the newest step-N if the pointer is missing or stale."""
        pointer = self.root / "latest"
        if pointer.exists():
            target = self.root / pointer.read_text().strip()
            if _STEP.match(target.name) and target.is_dir():
                return target
        steps = self.steps()
        return self.path(steps[-1]) if steps else None

    def save(self, trainer, step: int, extra_state: dict) -> Path:
        """`trainer.save_checkpoint` into a temporary dir, rename, point `latest` at it, prune."""
        final = self.path(step)
        tmp = self.root / f".step-{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        trainer.save_checkpoint(tmp, extra_state)
        if final.exists():  # re-saving a step (a resumed run): swap, never leave a gap
            old = self.root / f".step-{step}.old.tmp"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        atomic_write_text(self.root / "latest", final.name + "\n")
        self._prune(keep=final)
        return final

    def _prune(self, keep: Path) -> None:
        steps = self.steps()
        for s in steps[:-self.keep_last]:
            if self.path(s) != keep:
                shutil.rmtree(self.path(s), ignore_errors=True)
