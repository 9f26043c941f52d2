"""The run directory: atomic writes, stage manifests and the skip rule.

Layout (docs/DESIGN.md section 2): `runs/<experiment>/config.yaml`, and per stage
`<stage dir>/manifest.json` with status, the stage's input hash, timings, outputs and
final metrics. A stage is skipped when its manifest says `done` for the same input hash.
Stage names contain ':' (`sft:math`); their directories use '-' (`sft-math`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from engine.atomic import atomic_write_json, atomic_write_text  # noqa: F401  (re-exported)


def stage_dirname(stage: str) -> str:
    return stage.replace(":", "-")


class RunDir:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage_dirname(stage)

    def manifest_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / "manifest.json"

    def read_manifest(self, stage: str) -> dict | None:
        p = self.manifest_path(stage)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise RuntimeError(f"corrupt manifest {p}: {exc}") from exc

    def is_done(self, stage: str, input_hash: str) -> bool:
        m = self.read_manifest(stage)
        return bool(m) and m.get("status") == "done" and m.get("input_hash") == input_hash

    def write_manifest(self, stage: str, **fields) -> dict:
        m = self.read_manifest(stage) or {}
        m.update(fields, stage=stage, updated=time.time())
        atomic_write_json(self.manifest_path(stage), m)
        return m

    def output(self, stage: str, key: str) -> str:
        """An output path recorded by a finished stage (e.g. its final checkpoint)."""
        m = self.read_manifest(stage)
        if not m or m.get("status") != "done":
            raise RuntimeError(f"stage {stage} has not finished in {self.root}")
        try:
            return m["outputs"][key]
        except KeyError:
            raise RuntimeError(f"stage {stage} recorded no output {key!r} in {self.manifest_path(stage)}") from None
