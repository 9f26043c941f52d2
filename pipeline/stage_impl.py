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
    """Every model stage of the graph on every domain's eval rows -> `eval/results.json`."""
    from engine.atomic import atomic_write_json
    from pipeline.evaluate import EvalSet, EvalSettings, evaluate_models, model_label, models_to_evaluate
    from rewards import ScorerPool

    cfg = ctx.cfg
    models = {model_label(s): ctx.model_dir(s) for s in models_to_evaluate(list(ctx.stage.deps))}
    sets = [EvalSet(d.name, d.verifier, read_rows(ctx, d.name, "eval"),
                    d.data.synthetic.generator if d.data.synthetic else d.verifier) for d in cfg.domains]
    settings = EvalSettings(samples=cfg.eval.samples, temperature=cfg.eval.temperature,
                            max_new_tokens=cfg.eval.max_new_tokens, max_prompts=cfg.eval.max_prompts)

    with ScorerPool(num_workers=max(1, int(cfg.resources_for(ctx.stage.name).num_cpus))) as pool:
        def score(verifier, texts, refs):
            return [r.score for r in pool.score(verifier, texts, refs)]

        results = evaluate_models(models, sets, lambda model_dir: _eval_policy(ctx, model_dir), score, settings)
    out = ctx.out_dir / "results.json"
    atomic_write_json(out, results)
    return {"outputs": {"results": str(out)}, "metrics": {"models": results["models"]}}


def _eval_policy(ctx: StageContext, model_dir: str):
    """A policy `(eval_set, rows, temperature, n) -> texts` backed by a local HF generator."""
    from engine.chat import render_prompt
    from engine.domains import get_domain
    from engine.generation import SamplingParams, build_generator
    from engine.model import load_tokenizer
    from engine.rollout import rollout

    cfg = ctx.cfg
    tokenizer = load_tokenizer(cfg.model.tokenizer or model_dir)
    generator = build_generator(cfg.generator, model_dir, tokenizer=tokenizer, dtype=cfg.model.dtype)
    stop_ids = [tokenizer.convert_tokens_to_ids("</tool_call>")]

    def policy(es, rows, temperature, n):
        env = _domain_environment(get_domain, es.environment_name)
        sampling = SamplingParams(n=n, temperature=temperature, max_new_tokens=cfg.eval.max_new_tokens,
                                  stop_token_ids=stop_ids if env is not None else [], seed=cfg.seed)
        prompts = [render_prompt(r["messages"], tokenizer) for r in rows]
        max_turns = cfg.domain(es.domain).grpo.max_turns if env is not None else 1
        trajs = rollout(generator, prompts, sampling, tokenizer=tokenizer, environment=env, max_turns=max_turns)
        return [t.text for t in trajs]

    policy.close = generator.close  # evaluate_models releases each model before the next
    return policy


def _domain_environment(get_domain, name: str | None):
    """The tool environment of a multi-turn domain, None for single-turn domains."""
    if name is None:
        return None
    try:
        dom = get_domain(name)
    except KeyError:
        return None
    make = getattr(dom, "environment", None)
    return make() if callable(make) else None


def report(ctx: StageContext) -> dict:
    """`report/report.md` + plots from everything in the run directory."""
    from pipeline.report import write_report

    path = write_report(ctx.run.root)
    return {"outputs": {"report": str(path)}}
