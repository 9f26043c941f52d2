"""The experiment schema: one YAML file = one frozen, validated `ExperimentConfig`.

Every section maps one-to-one onto a pydantic model with `extra="forbid"`; stage
settings (`SFTSettings`, `GRPOSettings`, `OPDSettings`, `TrainerSettings`) live next to
the code that uses them and are composed here. `load_config` applies dotted overrides
(`domains.math.grpo.lr=1e-5`, `opd.rounds=3`), validates, then runs the checks across
sections (`cross_errors`: unique domain names, teachers of existing domains, GPU backends
with GPUs) and those that need the file system or the registries (data files exist,
verifiers are known, teachers share the student's vocabulary); every problem is
reported as `<yaml.path>: <reason>`, list items by index (`opd.teachers[0].domain`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import Field, PositiveInt, ValidationError, model_validator

from distill.opd_settings import OPDSettings
from engine.modes import ModeSettings, check_modes, route_key
from engine.settings import Settings
from pipeline.config_paths import adapter_errors, model_path_errors, plugin_errors, run_dir_errors
from pipeline.config_yaml import YAMLProblem, parse_yaml
from engine.tiny_spec import TinySpec
from engine.toy_hf import ToyHFSpec
from engine.trainer_settings import TrainerSettings
from engine.vllm_support import vllm_missing
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
    HASH_NEUTRAL_DEFAULTS: ClassVar[dict] = {"enforce_eager": False}

    backend: Literal["hf", "vllm"] = "hf"
    batch_size: PositiveInt = 64
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=1.0)
    enforce_eager: bool = Field(False, description="vLLM: no torch.compile / CUDA graphs (a faster engine start, "
                                                   "slower decoding; the CPU tests use it)")


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


# ---------------------------------------------------------------- loading + overrides


def _parse_value(text: str, path: str) -> Any:
    if text == "":
        return ""
    try:
        return parse_yaml(text, f"the override of {path}")
    except YAMLProblem as exc:
        inner = exc.path if exc.path.startswith("[") or not exc.path else "." + exc.path
        raise ConfigError([(path + inner, f"override value: {exc.reason}")]) from None


def apply_override(raw: dict, dotted: str) -> None:
    """Set `a.b.c=value` in a raw YAML dict; list items are addressed by `name` or index."""
    if "=" not in dotted:
        raise ConfigError([(dotted, "override must look like path.to.key=value")])
    path, value = dotted.split("=", 1)
    keys = path.split(".")
    node: Any = raw
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            match = [x for x in node if isinstance(x, dict) and x.get("name") == key]
            if match:
                idx = node.index(match[0])
            elif key.isdigit() and int(key) < len(node):
                idx = int(key)
            else:
                raise ConfigError([(where, "no list item with this name or index")])
            if last:
                node[idx] = _parse_value(value, path)
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[key] = _parse_value(value, path)
            else:
                node = node.setdefault(key, {})
        else:
            raise ConfigError([(where, "cannot descend into a scalar")])


def format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("function-", "model-")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def load_raw(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError([(str(path), "config file not found")])
    try:
        raw = parse_yaml(p.read_bytes(), str(path))
    except OSError as exc:
        raise ConfigError([(str(path), f"cannot read: {exc}")]) from None
    except YAMLProblem as exc:
        raise ConfigError([(exc.path or str(path), exc.reason)]) from None
    if not isinstance(raw, dict):
        raise ConfigError([(str(path), "top level must be a mapping")])
    return raw


def load_config(path: str | Path, overrides: list[str] = (), check_files: bool = True) -> ExperimentConfig:
    raw = load_raw(path)
    raw = copy.deepcopy(raw)
    for o in overrides:
        apply_override(raw, o)
    activate_python_path(raw.get("python_path"), Path(path).parent)
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        errors = [(format_loc(e["loc"]), e["msg"]) for e in exc.errors()]
        errors += _semantic_errors_raw(raw, Path(path).parent) if check_files else []
        raise ConfigError(errors) from None
    errors = cross_errors(cfg)
    if check_files:
        errors += semantic_errors(cfg, Path(path).parent)
    if errors:
        raise ConfigError(errors)
    return cfg


def cross_errors(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """Checks across sections (unique domains, teachers and student init name domains,
    GPU-only backends have GPUs), each at the YAML path of the offending item."""
    errors: list[tuple[str, str]] = []
    names = cfg.domain_names
    for i, name in enumerate(names):
        if name in names[:i]:
            errors.append((f"domains[{i}].name", f"duplicate domain name {name!r} (also domains[{names.index(name)}])"))
    for i, t in enumerate(cfg.opd.teachers or []):
        if t.domain not in names:
            errors.append((f"opd.teachers[{i}].domain", f"{t.domain!r} is not one of the domains {names}"))
        elif t.mode is not None and t.mode not in (cfg.domain(t.domain).modes or {}):
            errors.append((f"opd.teachers[{i}].mode", f"{t.mode!r} is not one of domain {t.domain!r}'s modes "
                                                      f"{list(cfg.domain(t.domain).modes or {})}"))
    errors += _teacher_route_errors(cfg.opd.teachers or [])
    shares = cfg.student_sft.domain_shares or {}
    errors += [(f"student_sft.domain_shares.{d}", f"{d!r} is not one of the domains {names}")
               for d in shares if d not in names]
    init = cfg.opd.student_init
    if init.startswith("sft:") and init != "sft:all":
        if init[4:] not in names:
            errors.append(("opd.student_init", f"{init!r}: no such domain; domains: {names}"))
        elif cfg.expert_init == "sft:all":
            errors.append(("opd.student_init", f"{init!r}: there are no per-domain SFT stages with expert_init "
                                               "'sft:all'; use 'sft:all' or 'base'"))
    if cfg.expert_init == "sft:all":
        errors += [(f"domains[{i}].sft", "not used: with expert_init 'sft:all' every expert starts from the "
                                         "shared SFT (student_sft); remove it or set expert_init 'sft:domain'")
                   for i, d in enumerate(cfg.domains) if "sft" in d.model_fields_set]
    if cfg.generator.backend == "vllm" and (missing := vllm_missing(cfg.resources.num_gpus)):
        errors.append(("generator.backend", missing))
    if cfg.trainer.device == "cuda" and cfg.resources.num_gpus == 0:
        errors.append(("trainer.device", "'cuda' needs resources.num_gpus > 0"))
    errors += _stage_resource_errors(cfg)
    errors += _rank_errors(cfg)
    if cfg.opd.pipelined and cfg.model.dtype != "fp32" and teach_resources(cfg)[0] is None:
        # transformers sets torch's default dtype process-wide while it builds a model: a
        # teacher loaded beside the training student would change the student's tensors
        errors.append(("opd.pipelined", f"with model.dtype {cfg.model.dtype!r} the pipelined teach phase must run "
                                        "on Ray tasks: set resources.stages.teach (loading a teacher in the stage "
                                        "process while the student trains changes torch's default dtype under it)"))
    return errors


def _stage_resource_errors(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """`resources.stages` keys name a stage of this config's graph, a stage kind, `teach`
    (OPD's teacher prefill tasks, per teacher) or `teach:<domain>` (one teacher's)."""
    from pipeline.graph import STAGE_KINDS, build_graph

    names = [s.name for s in build_graph(cfg)]
    routes = [t.domain for t in cfg.teachers()]
    errors = []
    for key in cfg.resources.stages:
        if key.startswith(TEACH_RESOURCES + ":"):
            if key.split(":", 1)[1] not in routes:
                errors.append((f"resources.stages.{key}", f"no OPD teacher for domain {key.split(':', 1)[1]!r}; "
                                                          f"teachers' domains: {routes}"))
        elif key not in names and key not in STAGE_KINDS and key != TEACH_RESOURCES:
            errors.append((f"resources.stages.{key}", f"no stage or stage kind {key!r}; stages: {names}, kinds: "
                                                      f"{list(STAGE_KINDS)} (or 'teach', 'teach:<domain>')"))
    return errors


def teach_resources(cfg: ExperimentConfig) -> tuple[StageResources | None, dict[str, StageResources]]:
    """OPD's teacher prefill resources: (`resources.stages.teach`, {domain: `teach:<domain>`}).
    Either one set puts the teach phase on Ray tasks; a teacher without its own entry takes
    `teach`, or `resources.default` when only per-teacher entries are given."""
    stages = cfg.resources.stages
    per = {k.split(":", 1)[1]: v for k, v in stages.items() if k.startswith(TEACH_RESOURCES + ":")}
    base = stages.get(TEACH_RESOURCES)
    return (base if base is not None or not per else cfg.resources.default), per


def _teacher_route_errors(teachers) -> list[tuple[str, str]]:
    """One teacher per OPD route (the domain, or `domain@mode`): OPD routes each sample to
    exactly one teacher, and there is no setting that splits a route's samples between
    two, so a second teacher for a route would silently replace the first."""
    first: dict[str, int] = {}
    errors = []
    for i, t in enumerate(teachers):
        route = route_key(t.domain, t.mode)
        if route in first:
            errors.append((f"opd.teachers[{i}].domain",
                           f"a second teacher for route {route!r} (also opd.teachers[{first[route]}]); "
                           "each route takes one teacher (splitting a route's samples is not supported)"))
        first.setdefault(route, i)
    return errors


TRAINER_STAGE_KINDS = ("sft", "grpo", "mixed_rl", "opd")
TEACH_RESOURCES = "teach"  # resources.stages key: OPD's teacher prefill on Ray tasks


def _rank_errors(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """trainer_ranks > 1 only where a stage trains, and on CUDA with a whole GPU per rank."""
    errors = []
    named = [(f"resources.stages.{k}", v) for k, v in cfg.resources.stages.items()]
    for where, res in [("resources.default", cfg.resources.default), *named]:
        if res.trainer_ranks == 1:
            continue
        kind = where.rsplit(".", 1)[-1].split(":")[0]
        if where != "resources.default" and kind not in TRAINER_STAGE_KINDS:
            errors.append((f"{where}.trainer_ranks", f"stage {kind!r} has no trainer; trainer ranks apply to "
                                                     f"{list(TRAINER_STAGE_KINDS)}"))
        if cfg.trainer.device == "cuda" and res.num_gpus < 1:
            errors.append((f"{where}.num_gpus", f"{res.trainer_ranks} CUDA trainer ranks need num_gpus >= 1 "
                                                f"(per rank), got {res.num_gpus:g}"))
    for key, teach in cfg.resources.stages.items():  # OPD's teacher prefill tasks (pipeline.actors)
        if key.split(":")[0] == TEACH_RESOURCES and cfg.trainer.device == "cuda" and teach.num_gpus < 1:
            errors.append((f"resources.stages.{key}.num_gpus", f"teacher prefill on CUDA needs num_gpus >= 1 per "
                                                                f"teacher, got {teach.num_gpus:g}"))
    return errors


def resolve_path(p: str, base: Path) -> Path:
    """A relative data path is read relative to the working directory, else the config's."""
    cand = Path(p)
    if cand.is_absolute() or cand.exists():
        return cand
    return base / cand


def _semantic_errors_raw(raw: dict, base: Path) -> list[tuple[str, str]]:
    """File and registry checks on a config that failed schema validation (best effort)."""
    errors = []
    for i, d in enumerate(raw.get("domains") or []):
        if not isinstance(d, dict):
            continue
        data = d.get("data") if isinstance(d.get("data"), dict) else {}
        for split in ("train", "eval"):
            if isinstance(data.get(split), str) and not resolve_path(data[split], base).exists():
                errors.append((f"domains[{i}].data.{split}", f"file not found: {data[split]}"))
        if isinstance(d.get("verifier"), str):
            errors += _verifier_errors(d["verifier"], f"domains[{i}].verifier")
    return errors


def activate_python_path(dirs: Any, base: Path) -> None:
    """Make the config's `python_path` importable here and in the processes started from
    here (engine.plugins.activate); missing directories are left to `semantic_errors`."""
    from engine.plugins import activate

    if isinstance(dirs, list):
        activate([resolve_path(d, base) for d in dirs if isinstance(d, str) and resolve_path(d, base).is_dir()])


def _verifier_errors(name: str, where: str) -> list[tuple[str, str]]:
    from engine.plugins import is_import_path

    if is_import_path(name):
        errors = plugin_errors(name, where, "verifier", ("completion", "reference"))
        if not errors:
            from rewards.batch import declared_timeout_s

            try:
                declared_timeout_s(name)
            except ValueError as exc:
                errors.append((where, str(exc)))
        return errors
    from rewards import known_verifiers

    known = known_verifiers()
    return [] if name in known else [(where, f"unknown verifier {name!r}; known: {sorted(known)}")]


ENVIRONMENTS = ("row_tools",)  # built-in tool environments a domain can name


def _environment_errors(d: "DomainConfig", where: str) -> list[tuple[str, str]]:
    from engine.plugins import is_import_path

    if d.environment is None:
        return []
    if is_import_path(d.environment):
        return plugin_errors(d.environment, where, "tool environment", ("reference",))
    if d.environment not in ENVIRONMENTS:
        return [(where, f"unknown tool environment {d.environment!r}; built-in: {list(ENVIRONMENTS)} "
                        "or 'package.module:function'")]
    return []


def semantic_errors(cfg: ExperimentConfig, base: Path) -> list[tuple[str, str]]:
    from engine.domains import known_domains

    errors: list[tuple[str, str]] = []
    for i, d in enumerate(cfg.domains):
        where = f"domains[{i}]"
        if d.data.synthetic and d.data.synthetic.generator not in known_domains():
            errors.append((f"{where}.data.synthetic.generator",
                           f"unknown generator {d.data.synthetic.generator!r}; known: {sorted(known_domains())}"))
        for split in ("train", "eval"):
            p = getattr(d.data, split)
            if isinstance(p, str) and not resolve_path(p, base).exists():
                errors.append((f"{where}.data.{split}", f"file not found: {p}"))
            if isinstance(p, HFData):
                errors += _hf_source_errors(p.hf, base, f"{where}.data.{split}.hf")
        errors += _verifier_errors(d.verifier, f"{where}.verifier")
        errors += _environment_errors(d, f"{where}.environment")
    errors += [(f"python_path[{i}]", f"directory not found: {p}") for i, p in enumerate(cfg.python_path)
               if not resolve_path(p, base).is_dir()]
    if cfg.model.base not in BUILT_BASES and not Path(cfg.model.base).is_dir():
        if not _looks_like_hub_id(cfg.model.base):
            errors.append(("model.base", f"not 'tiny' and not a directory: {cfg.model.base}"))
    errors += adapter_errors(cfg) + model_path_errors(cfg, _looks_like_hub_id) + run_dir_errors(cfg.run_path)
    errors += _chat_template_errors(cfg, base)
    errors += _multi_turn_errors(cfg)
    errors += _vocab_errors(cfg)
    return errors


def _hf_source_errors(src: HFSource, base: Path, where: str) -> list[tuple[str, str]]:
    """Local data files and dataset directories must exist; a hub id is checked when loaded."""
    files = [src.data_files] if isinstance(src.data_files, str) else list(src.data_files or [])
    errors = [(f"{where}.data_files", f"file not found: {f}") for f in files
              if not any(ch in f for ch in "*?[") and not resolve_path(f, base).exists()]
    local = src.path.startswith((".", "/")) or src.path.count("/") > 1
    if local and not resolve_path(src.path, base).exists():
        errors.append((f"{where}.path", f"dataset directory not found: {src.path}"))
    return errors


def _chat_template_errors(cfg: ExperimentConfig, base: Path) -> list[tuple[str, str]]:
    """Every path renders through a chat template: the tokenizer's own or `model.chat_template`.
    Checked for local directories; a hub id's template is checked when it is loaded."""
    from engine.chat import chat_template_of

    if cfg.model.chat_template is not None:
        if not resolve_path(cfg.model.chat_template, base).is_file():
            return [("model.chat_template", f"file not found: {cfg.model.chat_template}")]
        return []
    source = cfg.model.tokenizer or cfg.model.base
    if source in BUILT_BASES or not Path(source).is_dir():
        return []
    if chat_template_of(source) is None:
        key = "model.tokenizer" if cfg.model.tokenizer else "model.base"
        return [("model.chat_template", f"the tokenizer of {key} ({source}) has no chat template; "
                                        "set model.chat_template to a Jinja template file")]
    return []


def _multi_turn_errors(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """Multi-turn episodes need a tool environment: synthetic domains have their own, real
    rows scored by the `tool` verifier their rows' tools (engine.row_tools), others the one
    `environment` names."""
    return [(f"domains[{i}].grpo.max_turns",
             f"{d.grpo.max_turns} > 1 but domain {d.name!r} has no tool environment (synthetic domains and "
             "`tool`-verified rows have one); set max_turns: 1 or name an `environment`")
            for i, d in enumerate(cfg.domains)
            if d.data.synthetic is None and d.verifier != "tool" and d.environment is None and d.grpo.max_turns > 1
            and "max_turns" in d.grpo.model_fields_set]


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/"))


def _vocab_digest(tokenizer_json: dict) -> str:
    """Hash of a `tokenizer.json`'s vocabulary and added tokens (ids and contents)."""
    import hashlib

    model = tokenizer_json.get("model", {})
    added = tokenizer_json.get("added_tokens", [])
    return hashlib.sha256(json.dumps([model.get("vocab"), [(a["id"], a["content"]) for a in added]],
                                     sort_keys=True).encode()).hexdigest()


def _vocab_signature(model_dir: Path) -> tuple[int, str] | None:
    """(vocab_size, hash of the tokenizer vocabulary) of a local HF directory."""
    cfg = model_dir / "config.json"
    tok = model_dir / "tokenizer.json"
    if not cfg.is_file() or not tok.is_file():
        return None
    try:
        vocab_size = json.loads(cfg.read_text()).get("vocab_size")
        return vocab_size, _vocab_digest(json.loads(tok.read_text()))
    except (OSError, ValueError, AttributeError, KeyError, TypeError, RecursionError) as exc:
        raise ValueError(f"unreadable config.json/tokenizer.json in {model_dir}: {exc!r:.200}") from None


def _tiny_vocab_signature(spec: TinySpec) -> tuple[int, str]:
    """The signature `_vocab_signature` takes of a `model.base: tiny` student once built:
    the tiny tokenizer, its size rounded up to `spec.vocab_multiple`."""
    from engine.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    multiple = spec.vocab_multiple
    return -(-len(tok) // multiple) * multiple, _vocab_digest(json.loads(tok.backend_tokenizer.to_str()))


def _vocab_errors(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """External teachers must share the student's tokenizer and vocabulary."""
    errors = []
    teachers = [(i, t) for i, t in enumerate(cfg.opd.teachers or []) if t.path is not None]
    if not teachers:
        return errors
    if cfg.model.base == "tiny":
        student = _tiny_vocab_signature(cfg.model.tiny)
    elif cfg.model.base in BUILT_BASES:
        student = None
    else:
        try:
            student = _vocab_signature(Path(cfg.model.tokenizer or cfg.model.base))
        except ValueError as exc:
            return [("model.tokenizer" if cfg.model.tokenizer else "model.base", str(exc))]
    for i, t in teachers:
        where = f"opd.teachers[{i}].path"
        if not Path(t.path).is_dir():
            errors.append((where, f"teacher checkpoint not found: {t.path}"))
            continue
        try:
            sig = _vocab_signature(Path(t.path))
        except ValueError as exc:
            errors.append((where, str(exc)))
            continue
        if sig is None:
            errors.append((where, "no config.json/tokenizer.json in the teacher checkpoint"))
        elif student is not None and sig != student:
            same = ": same size, different tokens" if sig[0] == student[0] else ""
            errors.append((where, f"teacher vocabulary (size {sig[0]}) differs from the student's "
                                  f"(size {student[0]}){same}"))
    return errors


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
