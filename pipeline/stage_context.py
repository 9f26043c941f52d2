"""What a stage function receives: the config, its stage, the run directory and the
stage's input hash (`pipeline.stages.run_stage` builds it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ExperimentConfig
from pipeline.graph import Stage
from pipeline.rundir import RunDir


@dataclass
class StageContext:
    cfg: ExperimentConfig
    stage: Stage
    run: RunDir
    input_hash: str

    @property
    def out_dir(self) -> Path:
        return self.run.stage_dir(self.stage.name)

    def model_dir(self, stage: str) -> str:
        """Final HF checkpoint of a finished model stage ('prepare' = the base model)."""
        return self.run.output(stage, "model")
