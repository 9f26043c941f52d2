"""The experiment schema's sections: one pydantic model per YAML section, `extra="forbid"`,
frozen (`ExperimentConfig` and what it is made of, and `ConfigError`).

They live below `pipeline.config` (loading, overrides and the checks that need the file
system or the stage graph) so that the modules those checks use (`config_paths`, `graph`)
can name `ExperimentConfig` by importing downward; `pipeline.config` re-exports every name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field, PositiveInt, ValidationError, model_validator

from distill.opd_settings import OPDSettings
from engine.modes import ModeSettings, check_modes
from engine.settings import Settings
from engine.tiny_spec import TinySpec
from engine.toy_hf import ToyHFSpec
from engine.trainer_settings import TrainerSettings
from experts.grpo_settings import GRPOSettings
from experts.sft_settings import SFTSettings


class ConfigError(Exception):
    """A config that cannot run; `errors` holds `(yaml_path, reason)` pairs."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("\n".join(f"config error: {p}: {r}" for p, r in errors))


Frozen = Settings  # extra keys forbidden, frozen, no inf/nan, no boolean for a number


BUILT_BASES = ("tiny", "toy_hf")  # base models built offline in `prepare`


class ModelConfig(Frozen):
    # added after runs existed: out of the stage hashes while at these values (pipeline.graph._dump)
    HASH_NEUTRAL_DEFAULTS: ClassVar[dict] = {"reasoning_markers": None}

    base: str = Field("tiny", description="'tiny' or 'toy_hf' (built offline from `tiny` / `toy_hf`), "
                                          "a Hugging Face directory or hub id")
    tiny: TinySpec = TinySpec()
    toy_hf: ToyHFSpec = ToyHFSpec()
    tokenizer: str | None = Field(None, description="default: the base model's directory")
    chat_template: str | None = Field(None, description="a Jinja chat template file replacing the tokenizer's own "
                                                        "(required when the base model ships none)")
    dtype: Literal["fp32", "bf16"] = "fp32"
    reasoning_markers: tuple[str, str] | None = Field(
        None, description="the model's reasoning markers [open, close], e.g. ['<think>', '</think>']; default: "
                          "read off the chat template (what it writes around reasoning_content), else <think>/</think>")

    @model_validator(mode="after")
    def _markers(self):
        if self.reasoning_markers is not None:
            from engine.reasoning import ReasoningMarkers

            ReasoningMarkers(*self.reasoning_markers)  # two different non-empty strings
        return self


class SyntheticData(Frozen):
    generator: str
    train_size: PositiveInt = 2000
    eval_size: PositiveInt = 64


class HFSource(Frozen):
    """A split of a `datasets` dataset: a hub id, a builder (json, parquet) over local
    `data_files`, or a directory written by `save_to_disk`."""

    path: str
    name: str | None = None
    split: str = "train"
    data_files: str | list[str] | None = None


class HFData(Frozen):
    hf: HFSource


class DataConfig(Frozen):
    # added after runs existed: out of the prepare hash while at these values (pipeline.graph._dump)
    HASH_NEUTRAL_DEFAULTS: ClassVar[dict] = {"fields": None, "max_bad_fraction": 0.05, "tool_calls": "xml"}

    synthetic: SyntheticData | None = None
    train: str | HFData | None = Field(None, description="a JSONL/parquet file or {hf: {path, name, split}}")
    eval: str | HFData | None = None
    adapter: str | None = Field(None, description="row adapter for real datasets (gsm8k, math, mbpp, ifeval, xlam) "
                                                  "or your own as 'package.module:function'; none: rows in our format")
    fields: dict[str, str] | None = Field(
        None, description="the adapter's field -> your dataset's field, e.g. {question: problem, answer: solution}")
    tool_calls: Literal["xml", "native"] = Field(
        "xml", description="how tool rows (xlam, the tool domain: rows whose reference lists tools) carry tools and "
                           "calls: xml (tools listed in a system message, calls in the project's <tool_call><invoke> "
                           "form) or native (the row's tools rendered by the chat template's tools= argument, calls "
                           "as assistant tool_calls in the model family's own syntax: engine.tool_formats)")
    on_bad_row: Literal["skip", "error"] = "skip"
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0, description="prepare fails when a split has more bad "
                                                                     "rows than this fraction (on_bad_row: skip)")
    max_prompt_tokens: PositiveInt = 512

    @model_validator(mode="after")
    def _one_source(self):
        if (self.synthetic is None) == (self.train is None):
            raise ValueError("give exactly one of `synthetic` or `train` (+ `eval`)")
        if self.train is not None and self.eval is None:
            raise ValueError("`eval` is required with `train`")
        return self


class DomainConfig(Frozen):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    data: DataConfig
    verifier: str = Field(description="a built-in verifier (math, code, ifeval, tool, format) or your own as "
                                      "'package.module:function' (completion, reference) -> score")
    environment: str | None = Field(
        None, description="the tool environment of multi-turn episodes: 'row_tools' (each row's own "
                          "reference.tools) or 'package.module:function' (reference) -> an object with "
                          "execute(call_text) -> str; default: the synthetic domain's own, or row_tools "
                          "for the `tool` verifier")
    sft: SFTSettings = SFTSettings()
    grpo: GRPOSettings = GRPOSettings()
    modes: dict[str, ModeSettings] | None = Field(
        None, description="reasoning modes (non-think, think-high, think-max), each with its output budget "
                          "and reward shaping; one GRPO expert per mode (docs/modes.md)")

    @model_validator(mode="after")
    def _known_modes(self):
        problems = check_modes(self.modes or {})
        if problems:
            raise ValueError("; ".join(f"modes.{p}: {r}" for p, r in problems))
        if self.modes is not None and not self.modes:
            raise ValueError("modes: empty; list at least one mode or leave `modes` out")
        for name, m in (self.modes or {}).items():
            if "max_new_tokens" in m.grpo:
                raise ValueError(f"modes.{name}.grpo.max_new_tokens: the mode's own max_new_tokens is its budget")
            try:
                self.expert_grpo(name)
            except ValidationError as exc:
                raise ValueError("; ".join(f"modes.{name}.grpo.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                           for e in exc.errors())) from None
        return self

    def expert_grpo(self, mode: str | None) -> GRPOSettings:
        """The GRPO settings of this domain's expert for `mode`: the domain's `grpo`, with the
        mode's budget as max_new_tokens and its own `grpo` entries on top."""
        if mode is None:
            return self.grpo
        m = self.modes[mode]
        return GRPOSettings.model_validate({**self.grpo.model_dump(), **m.grpo, "max_new_tokens": m.max_new_tokens})

    @property
    def mode_names(self) -> list[str | None]:
        """This domain's modes, or [None] for a domain without modes."""
        return list(self.modes) if self.modes else [None]


class MixedRLConfig(Frozen):
    enabled: bool = False
    grpo: GRPOSettings = GRPOSettings()


class GeneratorConfig(Frozen):
    # added after runs existed: out of the stage hashes while at this value (pipeline.graph._dump)
    HASH_NEUTRAL_DEFAULTS: ClassVar[dict] = {"enforce_eager": False, "compact": True}

    backend: Literal["hf", "vllm"] = "hf"
    batch_size: PositiveInt = 64
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=1.0)
    enforce_eager: bool = Field(False, description="vLLM: no torch.compile / CUDA graphs (a faster engine start, "
                                                   "slower decoding; the CPU tests use it)")
    compact: bool = Field(True, description="hf: finished rows leave the batch (engine.generation); false: "
                                            "transformers generate, every row computed until the batch's last stops")


class EvalConfig(Frozen):
    max_new_tokens: PositiveInt = 96
    samples: int = Field(4, ge=0, description="k samples per prompt for sampled pass@1 (0: greedy only)")
    temperature: float = Field(1.0, gt=0.0)
    max_prompts: PositiveInt | None = None


class StageResources(Frozen):
    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    trainer_ranks: PositiveInt = 1


class ResourcesConfig(Frozen):
    num_cpus: PositiveInt = 2
    num_gpus: int = Field(0, ge=0)
    default: StageResources = StageResources()
    stages: dict[str, StageResources] = {}
    retries: int = Field(0, ge=0)
    concurrent_stages: PositiveInt = 1


class LoggingConfig(Frozen):
    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "polymath"
    progress: bool = Field(True, description="progress bars in stage logs; the runner's live table on a "
                                             "terminal, else a progress line per running stage")
    progress_every_s: float = Field(30.0, gt=0, description="seconds between progress lines off a terminal")
    samples_per_step: int = Field(4, ge=0, description="completions per step (GRPO, mixed RL; per round in OPD) "
                                                       "kept in <stage dir>/samples.jsonl and a wandb table")


class ExperimentConfig(Frozen):
    experiment: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    run_dir: str | None = Field(None, description="default: runs/<experiment>")
    python_path: list[str] = Field([], description="directories holding your plug-in modules (adapter, verifier, "
                                                   "environment as 'package.module:function'); relative to the "
                                                   "working directory, else to the config file's")
    seed: int = 0
    seeds: list[Annotated[int, Field(ge=0)]] = Field(
        [], description="run the graph once per seed (`run --seeds` overrides): the config's `seed` in `run_dir`, "
                        "every other in `<run_dir>-seed<N>`; `report` aggregates them (pipeline/seeds.py)")
    model: ModelConfig = ModelConfig()
    trainer: TrainerSettings = TrainerSettings()
    generator: GeneratorConfig = GeneratorConfig()
    domains: list[DomainConfig] = Field(min_length=1)
    student_sft: SFTSettings = Field(SFTSettings(), description="SFT of the OPD student / mixed-RL start on every domain's data (stage sft:all)")
    expert_init: Literal["sft:domain", "sft:all"] = Field(
        "sft:domain", description="where each domain's GRPO expert starts: 'sft:domain' (its own SFT stage, "
                                  "`domains[].sft`) or 'sft:all' (the shared SFT on every domain's data, "
                                  "`student_sft`, as the student and mixed RL do; no per-domain SFT stages)")
    opd: OPDSettings = OPDSettings()
    mixed_rl: MixedRLConfig = MixedRLConfig()
    eval: EvalConfig = EvalConfig()
    resources: ResourcesConfig = ResourcesConfig()
    logging: LoggingConfig = LoggingConfig()
    sandbox: Literal["isolated", "unsafe-local"] = Field(
        "isolated", description="code sandbox: 'isolated' (namespaces; where they cannot be set up code is not "
        "scored) or 'unsafe-local' (programs run unisolated on this machine: trusted code only)")
    max_verifier_error_rate: float = Field(
        1.0, gt=0.0, le=1.0, description="a stage stops when the verifier itself raised on at least this fraction "
        "of a scoring batch (of 8 or more items): a broken environment, not the model's output; below it such a "
        "row scores 0 and counts in the step's `verifier_errors`. 1.0: stop only when every item failed")

    # derived values
    @property
    def run_path(self) -> Path:
        return Path(self.run_dir or f"runs/{self.experiment}")

    @property
    def domain_names(self) -> list[str]:
        return [d.name for d in self.domains]

    def domain(self, name: str) -> DomainConfig:
        for d in self.domains:
            if d.name == name:
                return d
        raise KeyError(f"no domain {name!r}; known: {self.domain_names}")

    def expert_start(self, domain: str) -> str:
        """The stage whose model `grpo:<domain>` starts from (and is compared against)."""
        return "sft:all" if self.expert_init == "sft:all" else f"sft:{domain}"

    def teachers(self):
        from distill.opd_settings import TeacherSpec

        return self.opd.teachers or [TeacherSpec(domain=d.name, mode=m) for d in self.domains for m in d.mode_names]

    def resources_for(self, stage: str) -> StageResources:
        kind = stage.split(":")[0]
        return self.resources.stages.get(stage) or self.resources.stages.get(kind) or self.resources.default
