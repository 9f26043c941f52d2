"""What each stage kind does: builds its workers from the config and calls its driver.

Drivers (`experts.sft`, `experts.grpo`, `distill.opd`, `pipeline.evaluate`) receive their
workers (trainer, generator, scorer) as arguments; this module is the only place that
decides whether those are local objects or Ray actor groups.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.stage_io import data_source, export_stage, stage_tokenizer
from pipeline.stages import StageContext


# ------------------------------------------------------------------------------ prepare


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


def read_rows(ctx: StageContext, domain: str, split: str) -> list[dict]:
    from engine.data import load_rows

    return load_rows(ctx.run.output("prepare", f"data:{domain}:{split}"), on_bad_row="error")


# ------------------------------------------------------------------------------ trainers


def domain_environment(cfg, name: str, rows: list[dict], tokenizer):
    """The tool environment of a multi-turn domain, None for single-turn ones: a synthetic
    domain's own; for real tool rows (`tool` verifier, `grpo.max_turns` > 1) each row's own
    tools (engine.row_tools). Training, OPD and eval all take it from here."""
    from engine.domains import get_domain

    d = cfg.domain(name)
    if d.data.synthetic is not None:
        return get_domain(d.data.synthetic.generator).environment()
    if d.verifier == "tool" and d.grpo.max_turns > 1:
        from engine.row_tools import RowEnvironments

        return RowEnvironments(rows, tokenizer)
    return None


def _domain_spec_map(ctx: StageContext, names, tokenizer):
    """Verifier and tool environment of each domain (environment only for multi-turn ones)."""
    out = {}
    for n in names:
        rows = read_rows(ctx, n, "train") + read_rows(ctx, n, "eval")
        out[n] = (ctx.cfg.domain(n).verifier, domain_environment(ctx.cfg, n, rows, tokenizer))
    return out


def _make_trainer(ctx: StageContext, init_dir: str, **overrides):
    """A local trainer for one rank, or a Ray actor group of data-parallel ranks."""
    from engine.trainer import build_trainer, with_overrides

    settings = with_overrides(ctx.cfg.trainer, **overrides)
    res = ctx.cfg.resources_for(ctx.stage.name)
    tok = ctx.cfg.model.tokenizer or init_dir
    if res.trainer_ranks == 1:
        return build_trainer(settings, init_dir, tokenizer_dir=tok)
    import os

    from pipeline.actors import PLACEMENT_GROUP_ENV, TrainerGroup, join_ray

    join_ray()  # the cluster this stage runs in (pipeline run / ray job), or a local one
    return TrainerGroup(settings, init_dir, res.trainer_ranks, tokenizer_dir=tok, num_cpus_per_rank=res.num_cpus,
                        num_gpus_per_rank=res.num_gpus,
                        placement_group_name=os.environ.get(PLACEMENT_GROUP_ENV) or None)


def _logger(ctx: StageContext, total_steps: int, start_config: dict):
    from engine.metrics import MetricsLogger

    return MetricsLogger(ctx.out_dir, total_steps=total_steps, wandb_mode=ctx.cfg.logging.wandb,
                         project=ctx.cfg.logging.project, run_name=f"{ctx.cfg.experiment}/{ctx.stage.name}",
                         config=start_config, progress=ctx.cfg.logging.progress)


def _finish(trainer, logger) -> None:
    logger.close()
    if hasattr(trainer, "shutdown"):
        trainer.shutdown()


def sft(ctx: StageContext) -> dict:
    """`sft:<domain>` on that domain's demonstrations; `sft:all` on every domain's."""
    from engine.checkpoint import CheckpointManager
    from experts.sft import run_sft

    cfg = ctx.cfg
    target = ctx.stage.name.split(":", 1)[1]
    names = cfg.domain_names if target == "all" else [target]
    settings = cfg.student_sft if target == "all" else cfg.domain(target).sft
    base = ctx.model_dir("prepare")
    # Prompt-only rows (IFEval publishes no demonstrations) are for RL and eval, not SFT.
    train = [r for n in names for r in read_rows(ctx, n, "train") if _has_demonstration(r)]
    evals = [r for n in names for r in read_rows(ctx, n, "eval") if _has_demonstration(r)]
    tokenizer = stage_tokenizer(cfg, base)
    if not train:  # nothing to imitate: the stage's model is the base model
        print(f"[{ctx.stage.name}] no demonstrations in {names}: the base model is this stage's model", flush=True)
        return {"outputs": {"model": str(base), "final": export_stage(ctx, base, tokenizer)},
                "metrics": {"steps": 0, "skipped": "no demonstrations"}}
    trainer = _make_trainer(ctx, base, **settings.trainer_overrides())
    logger = _logger(ctx, settings.steps, settings.model_dump())
    checkpoints = CheckpointManager(ctx.out_dir / "checkpoints", keep_last=settings.keep_last)
    try:
        result = run_sft(settings, trainer=trainer, tokenizer=tokenizer, train_rows=train, eval_rows=evals,
                         out_dir=ctx.out_dir, logger=logger, checkpoints=checkpoints)
    finally:
        _finish(trainer, logger)
    latest = checkpoints.latest()
    return {"outputs": {"model": str(latest), "final": export_stage(ctx, latest, tokenizer)},
            "metrics": {"final_loss": result["final"].get("loss"), "eval_loss": result["final"].get("eval_loss"),
                        "steps": result["steps"]}}


def _has_demonstration(row: dict) -> bool:
    return any(m["role"] == "assistant" for m in row["messages"])


def _run_grpo_stage(ctx: StageContext, settings, init_dir: str, names: list[str], mode: str | None = None) -> dict:
    from engine.checkpoint import CheckpointManager
    from engine.generation import build_generator
    from experts.grpo import DomainSpec, run_grpo

    cfg = ctx.cfg
    tokenizer = stage_tokenizer(cfg, init_dir)
    train = [r for n in names for r in read_rows(ctx, n, "train") if mode is None or r.get("mode") == mode]
    specs = {n: DomainSpec(verifier=v, environment=e, modes=cfg.domain(n).modes)
             for n, (v, e) in _domain_spec_map(ctx, names, tokenizer).items()}
    trainer = _make_trainer(ctx, init_dir, lr=settings.lr, weight_decay=settings.weight_decay,
                            warmup_steps=settings.warmup_steps, grad_clip=settings.grad_clip,
                            schedule="constant", total_steps=None, seed=settings.seed)
    reference = None
    if settings.kl_beta > 0:
        from engine.trainer import build_trainer, with_overrides

        reference = build_trainer(with_overrides(cfg.trainer, seed=settings.seed), init_dir)
    generator = build_generator(cfg.generator, init_dir, tokenizer=tokenizer, dtype=cfg.model.dtype)
    logger = _logger(ctx, settings.steps, settings.model_dump())
    checkpoints = CheckpointManager(ctx.out_dir / "checkpoints", keep_last=settings.keep_last)
    scorer = _scorer_pool(cfg, max(1, int(cfg.resources_for(ctx.stage.name).num_cpus)))
    try:
        final = run_grpo(settings, trainer=trainer, generator=generator, scorer=scorer, tokenizer=tokenizer,
                         train_rows=train,
                         domains=specs, out_dir=ctx.out_dir, reference=reference, logger=logger,
                         checkpoints=checkpoints)
    finally:
        scorer.close()
        generator.close()
        _finish(trainer, logger)
    keep = ("reward_mean", "train/loss", "train/clip_frac_high", "train/approx_kl", "response_len")
    latest = checkpoints.latest()
    return {"outputs": {"model": str(latest), "final": export_stage(ctx, latest, tokenizer)},
            "metrics": {k: v for k, v in final.items() if k in keep or k.startswith(("reward/", "rollout_wal/"))}}


def grpo(ctx: StageContext) -> dict:
    """`grpo:<domain>`, or `grpo:<domain>@<mode>`: that mode's rows only, its budget and reward shaping."""
    from engine.modes import split_route

    d, mode = split_route(ctx.stage.name.split(":", 1)[1])
    settings = ctx.cfg.domain(d).grpo
    if mode is not None:
        settings = settings.model_copy(update={"max_new_tokens": ctx.cfg.domain(d).modes[mode].max_new_tokens})
    return _run_grpo_stage(ctx, settings, ctx.model_dir(f"sft:{d}"), [d], mode=mode)


def mixed_rl(ctx: StageContext) -> dict:
    """One GRPO run on every domain at once, from the OPD student's SFT start: the baseline."""
    return _run_grpo_stage(ctx, ctx.cfg.mixed_rl.grpo, ctx.model_dir("sft:all"), ctx.cfg.domain_names)


def _greedy_scores(generator, tokenizer, scorer, specs, rows_by_domain, s) -> dict[str, float]:
    """The student's greedy verifier score per domain on a slice of held-out prompts."""
    from engine.chat import render_row_prompt, tool_call_end_id
    from engine.generation import SamplingParams
    from engine.rollout import rollout

    out = {}
    for d, rows in sorted(rows_by_domain.items()):
        env = specs[d].environment
        sampling = SamplingParams(n=1, temperature=0.0, max_new_tokens=specs[d].max_new_tokens or s.max_new_tokens,
                                  stop_token_ids=[tool_call_end_id(tokenizer)] if env is not None else [])
        trajs = rollout(generator, [render_row_prompt(r, tokenizer) for r in rows], sampling,
                        tokenizer=tokenizer, environment=env, max_turns=s.max_turns)
        res = _checked_scores(scorer, f"OPD student eval, domain {d!r}")(
            specs[d].verifier, [t.text for t in trajs], [r["reference"] for r in rows])
        out[d] = sum(res) / max(len(res), 1)
    return out


def opd(ctx: StageContext) -> dict:
    from distill.heads import assert_same_vocab, extract_head
    from distill.opd import DomainSpec, TeacherRef, run_opd
    from engine.checkpoint import CheckpointManager
    from engine.generation import build_generator
    from engine.model import load_model

    cfg = ctx.cfg
    s = cfg.opd
    device = cfg.trainer.device  # teacher prefill and held-out KL run on the stage's device
    init = s.student_init
    student_dir = ctx.model_dir("prepare" if init == "base" else init) if (init == "base" or init.startswith("sft:")) else init
    from pipeline.graph import grpo_stage

    teachers = [TeacherRef(i, t.path or grpo_stage(t.domain, t.mode), t.domain,
                           t.path or ctx.model_dir(grpo_stage(t.domain, t.mode)), t.weight, t.mode)
                for i, t in enumerate(cfg.teachers())]
    assert_same_vocab(student_dir, [t.model_dir for t in teachers])
    head_paths = []
    for t in teachers:
        hp = ctx.out_dir / "heads" / f"teacher-{t.index}" / "head.safetensors"
        if not hp.is_file():
            extract_head(t.model_dir, hp)
        head_paths.append(str(hp))
    tokenizer = stage_tokenizer(cfg, student_dir)
    # keyed by route: the domain, or domain@mode with reasoning modes (one teacher each)
    by_domain = _domain_spec_map(ctx, sorted({t.domain for t in teachers}), tokenizer)
    specs = {t.route: DomainSpec(verifier=by_domain[t.domain][0], environment=by_domain[t.domain][1],
                                 max_new_tokens=cfg.domain(t.domain).modes[t.mode].max_new_tokens if t.mode else None)
             for t in teachers}

    def route_rows(t, split):
        return [r for r in read_rows(ctx, t.domain, split) if t.mode is None or r.get("mode") == t.mode]

    prompts = {t.route: route_rows(t, "train") for t in teachers}
    steps_per_round = -(-len(teachers) * s.prompts_per_domain * s.samples_per_prompt // s.mini_batch_size)
    total = s.rounds * s.epochs_per_round * steps_per_round
    trainer = _make_trainer(ctx, student_dir, lr=s.lr, weight_decay=s.weight_decay, grad_clip=s.grad_clip,
                            schedule=s.lr_schedule, total_steps=None if s.lr_schedule == "constant" else total,
                            warmup_steps=0, seed=s.seed)
    generator = build_generator(cfg.generator, student_dir, tokenizer=tokenizer, dtype=cfg.model.dtype)
    logger = _logger(ctx, total, s.model_dump())
    checkpoints = CheckpointManager(ctx.out_dir / "checkpoints", keep_last=2)
    scorer = _scorer_pool(cfg, max(1, int(cfg.resources_for(ctx.stage.name).num_cpus)))
    prefill = None
    teach = cfg.resources.stages.get("teach")  # the teach phase on Ray tasks, these resources per teacher
    if teach is not None:
        from pipeline.actors import TeacherPrefillPool, join_ray

        join_ray()
        prefill = TeacherPrefillPool(dtype=cfg.model.dtype, device=device, num_cpus=teach.num_cpus,
                                     num_gpus=teach.num_gpus)
    eval_rows = {t.route: route_rows(t, "eval")[:s.eval_prompts_per_round] for t in teachers}
    heldout = {t.route: route_rows(t, "eval")[:s.heldout_prompts_per_domain] for t in teachers}
    try:
        history = run_opd(s, trainer=trainer, generator=generator, tokenizer=tokenizer, prompts=prompts,
                          teachers=teachers, domains=specs, out_dir=ctx.out_dir, head_paths=head_paths,
                          load_teacher=lambda p: load_model(p, dtype=cfg.model.dtype, device=device),
                          checkpoints=checkpoints, logger=logger,
                          evaluate_student=(lambda g: _greedy_scores(g, tokenizer, scorer, specs, eval_rows, s))
                          if s.eval_prompts_per_round else None,
                          heldout=heldout if s.heldout_prompts_per_domain else None,
                          load_student=lambda: load_model(student_dir, dtype=cfg.model.dtype, device=device),
                          prefill=prefill)
    finally:
        scorer.close()
        generator.close()
        _finish(trainer, logger)
    latest = checkpoints.latest()
    return {"outputs": {"model": str(latest), "final": export_stage(ctx, latest, tokenizer)}, "metrics": history}


def evaluate(ctx: StageContext) -> dict:
    """Every model stage of the graph on every domain's eval rows -> `eval/results.json`."""
    import json

    from engine.atomic import atomic_write_json
    from pipeline.evaluate import EvalSet, EvalSettings, evaluate_models, model_label, models_to_evaluate

    cfg = ctx.cfg
    models = {model_label(s): ctx.model_dir(s) for s in models_to_evaluate(list(ctx.stage.deps))}
    from engine.modes import route_key

    # one set per (domain, mode) where a domain has modes, at the mode's budget
    sets = [EvalSet(route_key(d.name, m), d.verifier,
                    [r for r in read_rows(ctx, d.name, "eval") if m is None or r.get("mode") == m],
                    d.data.synthetic.generator if d.data.synthetic else None,
                    d.modes[m].max_new_tokens if m else None)
            for d in cfg.domains for m in d.mode_names]
    settings = EvalSettings(samples=cfg.eval.samples, temperature=cfg.eval.temperature,
                            max_new_tokens=cfg.eval.max_new_tokens, max_prompts=cfg.eval.max_prompts)

    partial = ctx.out_dir / "partial.json"  # finished models, so an interrupted eval resumes
    done = json.loads(partial.read_text()) if partial.is_file() else {}

    def on_model(name, entry):
        done[name] = entry
        atomic_write_json(partial, done)

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
    with _scorer_pool(cfg, max(2, cpus)) as pool:
        results = evaluate_models(models, sets, lambda model_dir: _eval_policy(cfg, model_dir),
                                  _checked_scores(pool, "eval"), settings, done=done, on_model=on_model)
    out = ctx.out_dir / "results.json"
    atomic_write_json(out, results)
    return {"outputs": {"results": str(out)}, "metrics": {"models": results["models"]}}


def _scorer_pool(cfg, num_workers: int):
    """A `ScorerPool` with the config's code sandbox mode; `unsafe-local` is said in the stage log."""
    from rewards import ScorerPool

    if cfg.sandbox == "unsafe-local":
        print("WARNING: sandbox: unsafe-local: code completions run UNISOLATED on this machine "
              "(no namespaces, no throwaway uid)", flush=True)
    return ScorerPool(num_workers=num_workers, sandbox=cfg.sandbox)


def _checked_scores(pool, where: str):
    """`score(verifier, texts, refs) -> [float]` over `pool`, raising when a whole batch
    failed inside the verifier (`rewards.raise_if_all_verifier_errors`)."""
    from rewards import raise_if_all_verifier_errors

    def score(verifier, texts, refs):
        results = pool.score(verifier, texts, refs)
        raise_if_all_verifier_errors(results, verifier, where)
        return [r.score for r in results]

    return score


def _eval_model_worker(cfg, name: str, model_dir: str, sets, settings) -> dict:
    """One model's eval entry, in a worker process of the eval stage (one torch thread)."""
    import torch

    from pipeline.evaluate import evaluate_models

    torch.set_num_threads(1)
    entries: dict = {}
    with _scorer_pool(cfg, 1) as pool:
        evaluate_models({name: model_dir}, sets, lambda d: _eval_policy(cfg, d),
                        _checked_scores(pool, f"eval of {name}"), settings, log=lambda line: print(line, flush=True),
                        on_model=lambda _n, e: entries.update(e))
    return entries


def _eval_policy(cfg, model_dir: str):
    """A policy `(eval_set, rows, temperature, n) -> texts` backed by a local HF generator."""
    from engine.chat import render_row_prompt, tool_call_end_id
    from engine.generation import SamplingParams, build_generator
    from engine.rollout import rollout

    tokenizer = stage_tokenizer(cfg, model_dir)
    generator = build_generator(cfg.generator, model_dir, tokenizer=tokenizer, dtype=cfg.model.dtype)

    def policy(es, rows, temperature, n):
        from engine.modes import split_route

        domain, _ = split_route(es.domain)  # `math@think-high`: the math domain in one mode
        env = domain_environment(cfg, domain, rows, tokenizer)
        sampling = SamplingParams(n=n, temperature=temperature,
                                  max_new_tokens=es.max_new_tokens or cfg.eval.max_new_tokens,
                                  stop_token_ids=[tool_call_end_id(tokenizer)] if env is not None else [],
                                  seed=cfg.seed)
        prompts = [render_row_prompt(r, tokenizer) for r in rows]
        max_turns = cfg.domain(domain).grpo.max_turns if env is not None else 1
        trajs = rollout(generator, prompts, sampling, tokenizer=tokenizer, environment=env, max_turns=max_turns)
        return [t.text for t in trajs], [sum(t.response_mask) for t in trajs]  # texts, output tokens

    policy.close = generator.close  # evaluate_models releases each model before the next
    return policy


def report(ctx: StageContext) -> dict:
    """`report/report.md` + plots from everything in the run directory."""
    from pipeline.report import write_report

    path = write_report(ctx.run.root)
    return {"outputs": {"report": str(path)}}
