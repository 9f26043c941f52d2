"""The `eval` stage: every model stage of the graph on every domain's eval rows
(`pipeline.evaluate`), whole models spread over a process pool on CPU."""

from __future__ import annotations

from pipeline.eval_policy import eval_policy
from pipeline.stage_context import StageContext
from pipeline.stage_domains import prepared_rows
from pipeline.stage_workers import checked_scores, scorer_pool


def evaluate_stage(ctx: StageContext) -> dict:
    """Every model stage of the graph on every domain's eval rows -> `eval/results.json`."""
    import json

    from engine.atomic import atomic_write_json
    from engine.progress import ProgressFile
    from pipeline.evaluate import EvalSet, EvalSettings, evaluate_models, model_label, models_to_evaluate

    cfg = ctx.cfg
    models = {model_label(s): ctx.model_dir(s) for s in models_to_evaluate(list(ctx.stage.deps))}
    from engine.modes import route_key

    # one set per (domain, mode) where a domain has modes, at the mode's budget
    sets = [EvalSet(route_key(d.name, m), d.verifier,
                    [r for r in prepared_rows(ctx, d.name, "eval") if m is None or r.get("mode") == m],
                    d.data.synthetic.generator if d.data.synthetic else None,
                    d.modes[m].max_new_tokens if m else None)
            for d in cfg.domains for m in d.mode_names]
    settings = EvalSettings(samples=cfg.eval.samples, temperature=cfg.eval.temperature,
                            max_new_tokens=cfg.eval.max_new_tokens, max_prompts=cfg.eval.max_prompts)

    partial = ctx.out_dir / "partial.json"  # finished models, so an interrupted eval resumes
    done = json.loads(partial.read_text()) if partial.is_file() else {}

    progress = ProgressFile(ctx.out_dir, len(models), unit="model", every_s=0.0)
    progress.update(len(done))

    def on_model(name, entry):
        done[name] = entry
        atomic_write_json(partial, done)
        progress.update(len(done))

    # HF generation of a small model is Python-bound: with N CPUs, N processes each
    # evaluate whole models (one thread each). Other generators (vLLM on a GPU) keep one.
    cpus = int(cfg.resources_for(ctx.stage.name).num_cpus)
    todo = {n: m for n, m in models.items() if n not in done}
    workers = min(cpus, len(todo)) if cfg.generator.backend == "hf" else 1
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            futures = {ex.submit(_eval_model_worker, cfg, name, model_dir, sets, settings): name
                       for name, model_dir in todo.items()}
            for f in as_completed(futures):
                on_model(futures[f], f.result())
    # verifiers mostly wait on sandboxed subprocesses (code): at least two workers
    with scorer_pool(cfg, max(2, cpus)) as pool:
        results = evaluate_models(models, sets, lambda model_dir: eval_policy(cfg, model_dir),
                                  checked_scores(pool, "eval"), settings, done=done, on_model=on_model)
    out = ctx.out_dir / "results.json"
    atomic_write_json(out, results)
    _log_completions(ctx, done, results)
    return {"outputs": {"results": str(out)}, "metrics": {"models": results["models"]}}


def _eval_model_worker(cfg, name: str, model_dir: str, sets, settings) -> dict:
    """One model's eval entry, in a worker process of the eval stage (one torch thread)."""
    import torch

    from pipeline.evaluate import evaluate_models

    torch.set_num_threads(1)
    entries: dict = {}
    with scorer_pool(cfg, 1) as pool:
        evaluate_models({name: model_dir}, sets, lambda d: eval_policy(cfg, d),
                        checked_scores(pool, f"eval of {name}"), settings, log=lambda line: print(line, flush=True),
                        on_model=lambda _n, e: entries.update(e))
    return entries


def _log_completions(ctx: StageContext, entries: dict, results: dict) -> None:
    """Every completion with its score to `eval/samples.jsonl`; the scores (run summary and
    a models x domains table) and the greedy completions to the eval stage's wandb run."""
    from engine.atomic import atomic_write_jsonl
    from pipeline.stage_workers import stage_logger

    rows = [{"model": name, "route": domain, **c} for name, e in entries.items()
            for domain, cs in (e.get("completions") or {}).items() for c in cs]
    atomic_write_jsonl(ctx.out_dir / "samples.jsonl", rows)
    logger = stage_logger(ctx, None, ctx.cfg.eval.model_dump(), filename=None)
    try:
        logger.summary({f"greedy/{m}/{d}": v for m, by_d in results["models"].items() for d, v in by_d.items()})
        logger.log_table("eval/greedy", [{"model": m, **by_d} for m, by_d in results["models"].items()])
        if results.get("sampled"):
            logger.log_table("eval/pass@1", [{"model": m, **by_d} for m, by_d in results["sampled"].items()])
        logger.log_table("eval/completions", [r for r in rows if r["kind"] == "greedy"][:10_000])
    finally:
        logger.close()
