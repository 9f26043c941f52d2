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
from typing import Any

import yaml
from pydantic import ValidationError

from engine.modes import route_key
from pipeline.config_paths import adapter_errors, model_path_errors, plugin_errors, run_dir_errors
from pipeline.config_yaml import YAMLProblem, parse_yaml
from engine.tiny_spec import TinySpec
from engine.vllm_support import vllm_missing
from pipeline.config_schema import (  # noqa: F401  (re-exported: the schema is pipeline.config's public API)
    ConfigError,
    Frozen,
    BUILT_BASES,
    ModelConfig,
    SyntheticData,
    HFSource,
    HFData,
    DataConfig,
    DomainConfig,
    MixedRLConfig,
    GeneratorConfig,
    EvalConfig,
    StageResources,
    ResourcesConfig,
    LoggingConfig,
    ExperimentConfig,
)


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
