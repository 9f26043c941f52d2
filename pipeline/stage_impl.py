"""What each stage kind does: builds its workers from the config and calls its driver.

Drivers (`experts.sft`, `experts.grpo`, `distill.opd`, `pipeline.evaluate`) receive their
workers (trainer, generator, scorer) as arguments; this module is the only place that
decides whether those are local objects or Ray actor groups.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import resolve_path
from pipeline.stages import StageContext, StageNotBuilt


# ------------------------------------------------------------------------------ prepare


def prepare(ctx: StageContext) -> dict:
    """Materialise the base model + tokenizer and every domain's train/eval JSONL."""
    from engine.data import load_rows, write_jsonl
    from engine.model import TinySpec, materialize_tiny

    cfg = ctx.cfg
    out = ctx.out_dir
    if cfg.model.base == "tiny":
        spec = TinySpec(**cfg.model.tiny.model_dump())
        model_dir = materialize_tiny(spec, out / "base", seed=cfg.seed)
    else:
        model_dir = Path(cfg.model.base)
    outputs = {"model": str(model_dir)}
    counts = {}
    for d in cfg.domains:
        train_path = out / "data" / d.name / "train.jsonl"
        eval_path = out / "data" / d.name / "eval.jsonl"
        if d.data.synthetic is not None:
            from engine.domains import get_domain

            dom = get_domain(d.data.synthetic.generator)
            train = dom.generate("train", d.data.synthetic.train_size, seed=cfg.seed)
            evals = dom.generate("eval", d.data.synthetic.eval_size, seed=cfg.seed)
        else:
            base = Path(".")
            train = load_rows(resolve_path(d.data.train, base), on_bad_row=d.data.on_bad_row,
                              adapter=d.data.adapter, domain=d.name)
            evals = load_rows(resolve_path(d.data.eval, base), on_bad_row=d.data.on_bad_row,
                              adapter=d.data.adapter, domain=d.name)
        write_jsonl(train_path, train)
        write_jsonl(eval_path, evals)
        outputs[f"data:{d.name}:train"] = str(train_path)
        outputs[f"data:{d.name}:eval"] = str(eval_path)
        counts[d.name] = {"train": len(train), "eval": len(evals)}
    return {"outputs": outputs, "metrics": {"rows": counts}}


def read_rows(ctx: StageContext, domain: str, split: str) -> list[dict]:
    from engine.data import load_rows

    return load_rows(ctx.run.output("prepare", f"data:{domain}:{split}"), on_bad_row="error")


# ------------------------------------------------------------------------------ trainers


def sft(ctx: StageContext) -> dict:
    raise StageNotBuilt("the SFT driver is not built yet (issue 4)")


def grpo(ctx: StageContext) -> dict:
    raise StageNotBuilt("the GRPO driver is not built yet (issue 5)")


def mixed_rl(ctx: StageContext) -> dict:
    raise StageNotBuilt("the mixed-RL baseline is not built yet (issue 7)")


def opd(ctx: StageContext) -> dict:
    raise StageNotBuilt("the OPD driver is not built yet (issue 6)")


def evaluate(ctx: StageContext) -> dict:
    raise StageNotBuilt("the eval stage is not built yet (issue 7)")


def report(ctx: StageContext) -> dict:
    raise StageNotBuilt("the report stage is not built yet (issue 7)")
