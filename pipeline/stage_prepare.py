"""The `prepare` stage: the base model, its tokenizer and every domain's train/eval JSONL."""

from __future__ import annotations

from pathlib import Path

from pipeline.stage_context import StageContext
from pipeline.stage_io import data_source, stage_tokenizer


def prepare(ctx: StageContext) -> dict:
    """Materialise the base model + tokenizer and every domain's train/eval JSONL."""
    from engine.data import load_rows, write_jsonl
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
            from functools import partial

            from rewards import check_reference

            base = Path(".")
            kw = dict(on_bad_row=d.data.on_bad_row, adapter=d.data.adapter, domain=d.name,
                      max_prompt_tokens=d.data.max_prompt_tokens, tokenizer=tokenizer,
                      check_reference=partial(check_reference, d.verifier))
            train, evals = (load_rows(data_source(getattr(d.data, split), base), **kw) for split in ("train", "eval"))
        if d.modes:  # one row per (problem, mode): engine.modes
            from engine.modes import expand_modes

            train, evals = expand_modes(train, d.modes), expand_modes(evals, d.modes)
        write_jsonl(train_path, train)
        write_jsonl(eval_path, evals)
        outputs[f"data:{d.name}:train"] = str(train_path)
        outputs[f"data:{d.name}:eval"] = str(eval_path)
        counts[d.name] = {"train": len(train), "eval": len(evals)}
    return {"outputs": outputs, "metrics": {"rows": counts}}
