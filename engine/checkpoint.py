"""Stage checkpoints: `step-N/` directories under one root, `latest` naming the newest.

A checkpoint is written by the trainer into a temporary directory (`.step-N.tmp`), then
`checksums.json` (bytes + sha256 of every file) is added, the directory is renamed to
`step-N`, then `latest` is rewritten atomically: a reader following `latest` only ever
finds a complete checkpoint. A save that fails (disk full) removes its temporary
directory and raises an `OSError` naming the checkpoint; a process killed at any point
leaves at worst a temporary directory that the next run removes. Each `step-N/` is an HF
model directory (safetensors + config + tokenizer, so
`AutoModelForCausalLM.from_pretrained(step-N)` works) plus the trainer's
optimizer/scheduler/RNG state and the driver's `extra_state` (data position). Only the
newest `keep_last` checkpoints are kept.

`latest()` verifies the checksums (`verify_checkpoint`) before handing a checkpoint out:
a corrupt one (bit flip, truncation) is skipped with a warning for the previous one that
verifies, and if none does the `CheckpointError` names the corrupt file. A checkpoint
written before checksums existed (no `checksums.json`) is accepted with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from engine.atomic import atomic_write_text

log = logging.getLogger(__name__)
_STEP = re.compile(r"^step-(\d+)$")
CHECKSUMS = "checksums.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted; the message names the file."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def compute_checksums(root: Path) -> dict[str, dict]:
    """`{relative path: {"bytes", "sha256"}}` of every file under `root` but `checksums.json`."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p != root / CHECKSUMS)
    return {p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}


def _expected_checksums(path: Path) -> dict[str, dict]:
    sums_path = path / CHECKSUMS
    try:
        files = json.loads(sums_path.read_text())["files"]
        if not all(isinstance(m, dict) and isinstance(m["bytes"], int) and isinstance(m["sha256"], str)
                   for m in files.values()):
            raise ValueError("an entry lacks bytes/sha256")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"corrupt checkpoint file {sums_path}: {exc}") from None
    return files


def verify_checkpoint(path: str | os.PathLike) -> Path:
    """`path` if every file listed in its `checksums.json` is there with its size and
    sha256; else `CheckpointError("corrupt checkpoint file <file>: ...")`."""
    path = Path(path)
    if not (path / CHECKSUMS).is_file():
        log.warning("checkpoint %s has no %s (written before checksums): not verified", path, CHECKSUMS)
        return path
    for name, meta in _expected_checksums(path).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"corrupt checkpoint {path}: file {f} is missing")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"corrupt checkpoint file {f}: {size} bytes, {meta['bytes']} when saved")
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"corrupt checkpoint file {f}: sha256 differs")
    return path


class CheckpointManager:
    verify = staticmethod(verify_checkpoint)

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

    def _candidates(self) -> list[Path]:
        """The checkpoint `latest` names (if it is one), then every other step, newest first."""
        out = []
        pointer = self.root / "latest"
        if pointer.exists():
            target = self.root / pointer.read_text().strip()
            if _STEP.match(target.name) and target.is_dir():
                out.append(target)
        return out + [self.path(s) for s in reversed(self.steps()) if self.path(s) not in out]

    def latest(self) -> Path | None:
        """The checkpoint `latest` names, verified; a corrupt one is skipped (warning) for the
        newest other step that verifies. None without checkpoints; `CheckpointError` naming
        the first corrupt file when there are checkpoints but none verifies."""
        problems = []
        for path in self._candidates():
            try:
                return verify_checkpoint(path)
            except CheckpointError as exc:
                log.warning("skipping checkpoint %s: %s", path, exc)
                problems.append(str(exc))
        if problems:
            raise CheckpointError(f"no checkpoint under {self.root} verifies: " + "; ".join(problems))
        return None

    def save(self, trainer, step: int, extra_state: dict) -> Path:
        """`trainer.save_checkpoint` into a temporary dir, checksum, rename, point `latest` at it,
        prune. A failed write removes the temporary dir and raises an OSError naming `step-N`."""
        final = self.path(step)
        tmp = self.root / f".step-{step}.tmp"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            trainer.save_checkpoint(tmp, extra_state)
            (tmp / CHECKSUMS).write_text(json.dumps({"files": compute_checksums(tmp)}, indent=1) + "\n")
            self._install(tmp, final)
            atomic_write_text(self.root / "latest", final.name + "\n")
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            message = f"saving checkpoint step {step} to {final} failed: {e.strerror or e}"
            raise (OSError(e.errno, message) if e.errno is not None else OSError(message)) from e
        self._prune(keep=final)
        return final

    def _install(self, tmp: Path, final: Path) -> None:
        """Rename `tmp` to `final`; re-saving a step (a resumed run) swaps, never leaving a gap."""
        if not final.exists():
            os.replace(tmp, final)
            return
        old = self.root / f".{final.name}.old.tmp"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:
            os.replace(old, final)  # put the previous version back
            raise
        shutil.rmtree(old, ignore_errors=True)

    def _prune(self, keep: Path) -> None:
        steps = self.steps()
        for s in steps[:-self.keep_last]:
            if self.path(s) != keep:
                shutil.rmtree(self.path(s), ignore_errors=True)
