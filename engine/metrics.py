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


def _cell(value):
    """A wandb table cell: numbers and text as they are, anything else as JSON text."""
    if value is None or isinstance(value, (int, float, str, bool)):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def _truncate_jsonl(path: Path, step: int) -> None:
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # torn last line of a killed writer
            continue
        if row.get("step", 0) <= step:
            keep.append(line + "\n")
    atomic_write_text(path, "".join(keep))


class MetricsLogger:
    def __init__(self, out_dir: str | os.PathLike, *, total_steps: int | None = None, initial_step: int = 0,
                 wandb_mode: str = "offline", project: str = "polymath", run_name: str | None = None,
                 config: dict | None = None, progress: bool = True, filename: str | None = "metrics.jsonl",
                 group: str | None = None, job_type: str | None = None, run_id: str | None = None,
                 samples_per_step: int = 0):
        if wandb_mode not in WANDB_MODES:
            raise ValueError(f"MetricsLogger: wandb_mode {wandb_mode!r} is not one of {list(WANDB_MODES)}")
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / filename if filename else None
        self._file = open(self.path, "a", encoding="utf-8") if self.path else None
        self.samples_per_step = samples_per_step
        self.samples_path = self.dir / "samples.jsonl"
        self._wandb = self._start_wandb(wandb_mode, project, run_name, config,
                                        {"group": group, "job_type": job_type, "id": run_id})
        self._progress = ProgressFile(self.dir, total_steps) if total_steps else None
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc=run_name or self.dir.name,
                             dynamic_ncols=True)

    def _start_wandb(self, mode: str, project: str, run_name: str | None, config: dict | None, ident: dict):
        if mode == "disabled":
            return None
        wandb_dir = self.dir / "wandb"
        wandb_dir.mkdir(exist_ok=True)
        for key, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                         ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")):
            os.environ[key] = str(wandb_dir / sub)
        try:
            import wandb

            ident = {k: v for k, v in ident.items() if v}
            if "id" in ident:
                ident["resume"] = "allow"  # the same stage resumed: the same run
            return wandb.init(project=project, name=run_name, config=config or {}, mode=mode,
                              dir=str(wandb_dir), reinit="finish_previous", **ident)
        except Exception as e:  # noqa: BLE001 - wandb must never stop a run
            warnings.warn(f"wandb ({mode}) did not start, logging to {self.path} only: {e!r}", stacklevel=2)
            return None

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, "time": time.time(), **{k: _clean(v) for k, v in metrics.items()}}
        if self._file is not None:
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

    def log_samples(self, records: list[dict], step: int, key: str = "samples") -> None:
        """Append `records` (one completion each: prompt, completion, reward, route...) to
        `samples.jsonl`, each with its step, and log them to wandb as a table."""
        if not records:
            return
        rows = [{"step": step, **{k: _clean(v) for k, v in r.items()}} for r in records]
        with open(self.samples_path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self.log_table(key, rows, step=step)

    def log_table(self, key: str, rows: list[dict], step: int | None = None) -> None:
        """A list of same-keyed dicts as a wandb table (nothing without wandb)."""
        if self._wandb is None or not rows:
            return
        try:
            import wandb

            columns = list(dict.fromkeys(k for r in rows for k in r))
            table = wandb.Table(columns=columns, data=[[_cell(r.get(c)) for c in columns] for r in rows])
            self._wandb.log({key: table}, **({"step": step} if step is not None else {}))
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"wandb table {key!r} failed, disabling wandb: {e!r}", stacklevel=2)
            self._wandb = None

    def summary(self, values: dict) -> None:
        """Final values of the run (eval scores): wandb's run summary."""
        if self._wandb is None:
            return
        try:
            self._wandb.summary.update({k: _clean(v) for k, v in values.items()})
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"wandb summary failed: {e!r}", stacklevel=2)

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (a resumed run repeats the steps after its checkpoint)."""
        if self._file is not None:
            self._file.close()
            _truncate_jsonl(self.path, step)
            self._file = open(self.path, "a", encoding="utf-8")
        if self.samples_path.is_file():
            _truncate_jsonl(self.samples_path, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"wandb.finish failed: {e!r}", stacklevel=2)
