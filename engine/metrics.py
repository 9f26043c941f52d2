"""Per-step metrics: `metrics.jsonl` (one line per step, flushed as written), wandb
(offline unless told otherwise, all its files inside the run directory), a tqdm
progress bar, and `progress.json` (engine.progress) for the runner's progress lines. wandb is optional: if it cannot start, training goes on with a warning.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path

from engine.atomic import atomic_write_text
from engine.progress import ProgressFile

WANDB_MODES = ("offline", "online", "disabled")


def _clean(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    def __init__(self, out_dir: str | os.PathLike, *, total_steps: int | None = None, initial_step: int = 0,
                 wandb_mode: str = "offline", project: str = "polymath", run_name: str | None = None,
                 config: dict | None = None, progress: bool = True, filename: str = "metrics.jsonl"):
        if wandb_mode not in WANDB_MODES:
            raise ValueError(f"MetricsLogger: wandb_mode {wandb_mode!r} is not one of {list(WANDB_MODES)}")
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / filename
        self._file = open(self.path, "a", encoding="utf-8")
        self._wandb = self._start_wandb(wandb_mode, project, run_name, config)
        self._progress = ProgressFile(self.dir, total_steps) if total_steps else None
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc=run_name or self.dir.name,
                             dynamic_ncols=True)

    def _start_wandb(self, mode: str, project: str, run_name: str | None, config: dict | None):
        if mode == "disabled":
            return None
        wandb_dir = self.dir / "wandb"
        wandb_dir.mkdir(exist_ok=True)
        for key, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                         ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")):
            os.environ[key] = str(wandb_dir / sub)
        try:
            import wandb

            return wandb.init(project=project, name=run_name, config=config or {}, mode=mode,
                              dir=str(wandb_dir), reinit="finish_previous")
        except Exception as e:  # noqa: BLE001 - wandb must never stop a run
            warnings.warn(f"wandb ({mode}) did not start, logging to {self.path} only: {e!r}", stacklevel=2)
            return None

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, "time": time.time(), **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb is not None:
            try:
                self._wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"wandb.log failed, disabling wandb: {e!r}", stacklevel=2)
                self._wandb = None
        if self._progress is not None:
            self._progress.update(step)
        if self._bar is not None:
            shown = {k: f"{row[k]:.4g}" for k in ("loss", "eval_loss", "lr") if isinstance(row.get(k), float)}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(max(step - self._bar.n, 0))

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (a resumed run repeats the steps after its checkpoint)."""
        self._file.close()
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # torn last line of a killed writer
                continue
            if row.get("step", 0) <= step:
                keep.append(line + "\n")
        atomic_write_text(self.path, "".join(keep))
        self._file = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"wandb.finish failed: {e!r}", stacklevel=2)
