"""Reruns that lose nothing: a stage directory's earlier work is set aside, not deleted,
until the attempt that replaces it succeeds.

`<stage dir>/` holds the attempt for the current input hash. Beside it:
- `<stage dir>.previous/` the last *done* work displaced by an attempt for another input
  hash (or by `--force`); restored if that attempt fails, deleted when it succeeds;
- `<stage dir>.unfinished/` a failed or interrupted attempt set aside by a restore or by
  a run of another config; swapped back in (and resumed) when its input hash returns.
`stage.log` never moves: the runner appends every attempt to it (each after a
`===== ... attempt N` header), so the path it prints stays real and no attempt's log is lost.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pipeline.rundir import RunDir

LOG_NAME = "stage.log"  # stays in the stage directory across every move


SET_ASIDE = (".previous", ".unfinished", ".taking-")


def is_set_aside(dirname: str) -> bool:
    """Whether a run directory entry is set-aside work, not a stage's current directory."""
    return any(tag in dirname for tag in SET_ASIDE)


def previous_dir(run: RunDir, stage: str) -> Path:
    d = run.stage_dir(stage)
    return d.with_name(d.name + ".previous")


def unfinished_dir(run: RunDir, stage: str) -> Path:
    d = run.stage_dir(stage)
    return d.with_name(d.name + ".unfinished")


def _manifest(directory: Path) -> dict | None:
    try:
        return json.loads((directory / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _move_contents(src: Path, dst: Path) -> None:
    """Every entry of `src` but the log into a fresh `dst` (replacing what was there)."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for entry in src.iterdir():
        if entry.name != LOG_NAME:
            os.replace(entry, dst / entry.name)


def _set_aside(run: RunDir, stage: str) -> None:
    """Move the stage directory's work beside it: done work to `.previous`, else `.unfinished`."""
    d = run.stage_dir(stage)
    m = _manifest(d)
    if m is None:
        return
    _move_contents(d, previous_dir(run, stage) if m.get("status") == "done" else unfinished_dir(run, stage))


def prepare_attempt(run: RunDir, stage: str, input_hash: str, force: bool = False) -> str:
    """Make `<stage dir>` hold the work for `input_hash` before a stage runs; returns what it did:
    'in place' (already there: skip or resume), 'restored' (done work for this hash brought
    back from `.previous`), 'resumed' (an unfinished attempt brought back), or 'fresh'."""
    d = run.stage_dir(stage)
    cur = _manifest(d)
    if cur is not None and cur.get("input_hash") == input_hash and not (force and cur.get("status") == "done"):
        return "in place"
    take, how = None, "fresh"
    for candidate, status, label in ((previous_dir(run, stage), "done", "restored"),
                                     (unfinished_dir(run, stage), None, "resumed")):
        m = _manifest(candidate) if candidate.is_dir() else None
        if m and m.get("input_hash") == input_hash and (status is None or m.get("status") == status) and not force:
            take, how = candidate, label
            break
    if take is not None:  # out of the way first: setting the current work aside may replace it
        staged = take.with_name(take.name + f".taking-{os.getpid()}")
        os.replace(take, staged)
        take = staged
    _set_aside(run, stage)
    d.mkdir(parents=True, exist_ok=True)
    if take is not None:
        for entry in take.iterdir():
            os.replace(entry, d / entry.name)
        take.rmdir()
    return how


def attempt_failed(run: RunDir, stage: str, failure: dict) -> bool:
    """After a failed attempt: if done work was set aside for it, bring that back (the failed
    attempt goes to `.unfinished`, to resume if its config returns) and note the failure in
    the restored manifest. Returns whether it restored."""
    prev = previous_dir(run, stage)
    if not (prev.is_dir() and (_manifest(prev) or {}).get("status") == "done"):
        return False
    _move_contents(run.stage_dir(stage), unfinished_dir(run, stage))
    for entry in prev.iterdir():
        os.replace(entry, run.stage_dir(stage) / entry.name)
    prev.rmdir()
    run.write_manifest(stage, last_failed=failure)
    return True


def attempt_succeeded(run: RunDir, stage: str) -> None:
    """The new attempt replaces what it displaced: drop `.previous` and `.unfinished`."""
    for d in (previous_dir(run, stage), unfinished_dir(run, stage)):
        if d.is_dir():
            shutil.rmtree(d, ignore_errors=True)


def changed_inputs(new: dict, old: dict | None, prefix: str = "", limit: int = 6) -> list[str]:
    """Dotted paths where two stage-input dicts differ (`sft.lr`, `deps.sft:math`)."""
    if old is None:
        return []
    out: list[str] = []
    for key in sorted(set(new) | set(old)):
        path = f"{prefix}{key}"
        a, b = new.get(key, "<absent>"), old.get(key, "<absent>")
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_inputs(a, b, path + ".", limit)
        else:
            out.append(path)
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


def describe_change(inputs: dict, deps: dict, manifest: dict | None) -> str:
    """What changed since the stage's recorded attempt, for the console: '' when nothing is recorded."""
    if not manifest or "input_hash" not in manifest:
        return ""
    changed = [f"after {d} changed" for d, h in deps.items() if (manifest.get("deps") or {}).get(d) not in (None, h)]
    if "inputs" in manifest:
        changed = changed_inputs(inputs, manifest["inputs"]) + changed
    elif not changed:
        changed = ["its config sections (the earlier attempt did not record them)"]
    return ", ".join(changed)
