"""Up-front checks of what later stages will open or write, so a config fails in `validate`
and not hours into a run: the run directory can be created, the OPD student's starting
checkpoint and the tokenizer exist, each data adapter is registered. Each problem is a
`(yaml path, reason)` pair (see pipeline/config.py, which also checks data files,
verifiers, generators, the base model and external teachers).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config_schema import ExperimentConfig


def run_dir_errors(run_path: Path) -> list[tuple[str, str]]:
    """The run directory exists and is writable, or its nearest existing ancestor lets us
    create it: a directory is made there and removed again (a permission check alone
    passes for root on /proc and on read-only mounts)."""
    path = run_path.absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    if not existing.is_dir():
        return [("run_dir", f"{existing} is not a directory")]
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".polymath-write-check-", dir=existing))
    except OSError as exc:
        what = "the run directory" if existing == path else f"{path} (under {existing})"
        return [("run_dir", f"cannot write {what}: {exc.strerror or exc}")]
    return []


def model_path_errors(cfg: "ExperimentConfig", looks_like_hub_id) -> list[tuple[str, str]]:
    errors = []
    init = cfg.opd.student_init
    if init != "base" and not init.startswith("sft:"):
        if not Path(init).is_dir():
            errors.append(("opd.student_init", f"not 'base', 'sft:all', 'sft:<domain>' or a model directory: {init}"))
        elif not (Path(init) / "config.json").is_file():
            errors.append(("opd.student_init", f"no config.json in the student checkpoint {init}"))
    tok = cfg.model.tokenizer
    if tok is not None and not Path(tok).is_dir() and not looks_like_hub_id(tok):
        errors.append(("model.tokenizer", f"not a directory and not a Hugging Face hub id: {tok}"))
    elif tok is not None and Path(tok).is_dir() and not any(
            (Path(tok) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        errors.append(("model.tokenizer", f"no tokenizer.json or tokenizer_config.json in {tok}"))
    return errors


def plugin_errors(name: str, where: str, kind: str, args: tuple[str, ...],
                  kwargs: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """`name` (an import path) imports and takes `args`/`kwargs`; else one `(where, reason)`."""
    from engine.plugins import PluginError, load_object, signature_problem

    try:
        fn = load_object(name, kind)
    except PluginError as exc:
        return [(where, str(exc))]
    problem = signature_problem(fn, args, kwargs)
    return [(where, f"{kind} {name!r} {problem}")] if problem else []


def adapter_errors(cfg: "ExperimentConfig") -> list[tuple[str, str]]:
    """Each `data.adapter` is registered or imports (`package.module:function`, called as
    `f(record, domain=..., default_id=...)`), and each `data.fields` key is a field that
    adapter reads."""
    from engine.adapters import adapter_fields, known_adapters
    from engine.plugins import is_import_path

    errors = []
    for i, d in enumerate(cfg.domains):
        where = f"domains[{i}].data"
        name = d.data.adapter
        if is_import_path(name):
            problems = plugin_errors(name, f"{where}.adapter", "adapter", ("record",), ("domain", "default_id"))
            if problems:
                errors += problems
                continue
        elif name is not None and name not in known_adapters():
            errors.append((f"{where}.adapter", f"unknown adapter {name!r}; known: {known_adapters()} "
                                               "or 'package.module:function'"))
            continue
        if not d.data.fields:
            continue
        if d.data.synthetic is not None:
            errors.append((f"{where}.fields", "field mapping applies to data files, not synthetic data"))
            continue
        known = adapter_fields(name)
        if known is None:  # a user adapter that does not list its fields
            continue
        names = [*known[0], *known[1]]
        for target, source in d.data.fields.items():
            if target not in names:
                errors.append((f"{where}.fields.{target}", f"adapter {name or 'row'!r} has no field {target!r}; "
                                                           f"its fields: {names} (write {{adapter field: your field}})"))
            elif not source:
                errors.append((f"{where}.fields.{target}", "empty source field name"))
    return errors
