"""The `prepare` stage: the base model, its tokenizer and every domain's train/eval JSONL.

Data problems stop the run here: a split that keeps no rows, or has more bad rows than
`data.max_bad_fraction` (or any, with `on_bad_row: error`), fails the stage, and a domain
whose adapter produces demonstrations but whose training rows carry none fails too. Every
bad row is written with its file, line and reason to `bad_rows.jsonl` in the stage
directory; the count and the first reasons go to the stage's note (the runner's console
and summary) or its error."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.stage_context import StageContext
from pipeline.stage_io import data_source, stage_tokenizer


def prepare(ctx: StageContext) -> dict:
    """Materialise the base model + tokenizer and every domain's train/eval JSONL."""
    from engine.data import write_jsonl
    from engine.model import materialize_tiny

    cfg = ctx.cfg
    out = ctx.out_dir
    if cfg.model.base == "tiny":
        model_dir = materialize_tiny(cfg.model.tiny, out / "base", seed=cfg.seed)
    elif cfg.model.base == "toy_hf":
        from engine.toy_hf import materialize_toy_hf

        model_dir = materialize_toy_hf(cfg.model.toy_hf, out / "base", seed=cfg.seed)
    else:
        model_dir = Path(cfg.model.base)
    outputs = {"model": str(model_dir)}
    tokenizer = stage_tokenizer(cfg, model_dir)
    counts = {}
    bad_rows: list[dict] = []
    notes: list[str] = []
    for d in cfg.domains:
        train_path = out / "data" / d.name / "train.jsonl"
        eval_path = out / "data" / d.name / "eval.jsonl"
        if d.data.synthetic is not None:
            from engine.domains import get_domain

            dom = get_domain(d.data.synthetic.generator)
            train = dom.generate("train", d.data.synthetic.train_size, seed=cfg.seed)
            evals = dom.generate("eval", d.data.synthetic.eval_size, seed=cfg.seed)
            if dom.name != d.name:  # a generator under another domain name: rows carry the domain's
                train, evals = ([{**r, "domain": d.name} for r in rows] for rows in (train, evals))
        else:
            train, evals = (_real_split(ctx, d, split, tokenizer, bad_rows, notes) for split in ("train", "eval"))
            _check_demonstrations(d, train)
        if d.data.tool_calls == "native":  # tools through the template's tools=, calls as tool_calls
            from engine.data import DataError
            from engine.tool_formats import native_tool_rows

            try:
                train, evals = (native_tool_rows(rows, tokenizer, f"domain {d.name!r}") for rows in (train, evals))
            except ValueError as exc:
                raise DataError(str(exc)) from None
        if d.modes:  # one row per (problem, mode): engine.modes
            from engine.modes import expand_modes

            train, evals = expand_modes(train, d.modes), expand_modes(evals, d.modes)
        write_jsonl(train_path, train)
        write_jsonl(eval_path, evals)
        outputs[f"data:{d.name}:train"] = str(train_path)
        outputs[f"data:{d.name}:eval"] = str(eval_path)
        counts[d.name] = {"train": len(train), "eval": len(evals)}
    _write_bad_rows(out, bad_rows)
    metrics = {"rows": counts, **({"bad_rows": len(bad_rows)} if bad_rows else {})}
    return {"outputs": outputs, "metrics": metrics, **({"note": " | ".join(notes)} if notes else {})}


BAD_ROWS_FILE = "bad_rows.jsonl"
log = logging.getLogger("engine.data")  # where the row reader reports: one logger for bad rows


def _write_bad_rows(out: Path, bad_rows: list[dict]) -> None:
    import json

    from engine.atomic import atomic_write_text

    path = out / BAD_ROWS_FILE
    if bad_rows:
        atomic_write_text(path, "".join(json.dumps(b, ensure_ascii=False, default=str) + "\n" for b in bad_rows))
    elif path.exists():
        path.unlink()


def _real_split(ctx: StageContext, d, split: str, tokenizer, bad_rows: list[dict], notes: list[str]) -> list[dict]:
    """The rows of one split of a data source; raises DataError when the split must stop
    the run (engine.data.split_problem), after writing every bad row seen so far."""
    from functools import partial

    from engine.data import DataError, bad_rows_message, bad_rows_summary, read_rows, split_problem
    from rewards import check_reference

    source = data_source(getattr(d.data, split), Path("."))
    result = read_rows(source, adapter=d.data.adapter, domain=d.name,
                       fields=d.data.fields, max_prompt_tokens=d.data.max_prompt_tokens, tokenizer=tokenizer,
                       check_reference=partial(check_reference, d.verifier))
    bad_rows += [{"domain": d.name, "split": split, **b.to_dict()} for b in result.bad]
    total = len(result.rows) + len(result.bad)
    where = f"domain {d.name!r} {split}"
    problem = split_problem(len(result.rows), len(result.bad), d.data.max_bad_fraction)
    if problem is None and result.bad and d.data.on_bad_row == "error":
        problem = "bad rows with data.on_bad_row: error"
    if result.bad:
        log.warning("%s %s", "bad rows:" if problem else "skipping", bad_rows_message(source, result))
        if problem is None:
            notes.append(f"{where}: {bad_rows_summary(result.bad, total)} (skipped; all in "
                         f"{ctx.out_dir / BAD_ROWS_FILE})")
    if problem is not None:
        _write_bad_rows(ctx.out_dir, bad_rows)
        if not result.bad:
            raise DataError(f"{where}: {problem}")
        raise DataError(f"{where}: {problem}; every bad row with its reason: {ctx.out_dir / BAD_ROWS_FILE}\n"
                        + bad_rows_message(source, result))
    return result.rows


def _check_demonstrations(d, train: list[dict]) -> None:
    """A domain whose adapter writes demonstrations must have some among its training rows."""
    from engine.adapters import adapter_demonstrations
    from engine.data import DataError

    if adapter_demonstrations(d.data.adapter) and not any(
            m["role"] == "assistant" for r in train for m in r["messages"]):
        raise DataError(f"domain {d.name!r}: adapter {d.data.adapter!r} writes demonstrations, but none of the "
                        f"{len(train)} training rows has one")
