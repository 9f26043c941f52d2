"""The `opd` stage: multi-teacher on-policy distillation (`distill.opd`) into the student."""

from __future__ import annotations

from pipeline.progress import opd_total_steps
from pipeline.stage_context import StageContext
from pipeline.stage_domains import domain_spec_map, prepared_rows
from pipeline.stage_io import export_stage, stage_tokenizer
from pipeline.stage_workers import close_workers, make_trainer, scorer_pool, stage_logger


def _greedy_scores(generator, tokenizer, scorer, specs, rows_by_domain, s) -> dict[str, float]:
    """The student's greedy verifier score per route on a slice of held-out prompts."""
    from engine.episode import roll_out, score_samples

    out = {}
    for d, rows in sorted(rows_by_domain.items()):
        samples = roll_out(rows, d, specs[d], generator=generator, tokenizer=tokenizer, n=1, temperature=0.0,
                           max_new_tokens=specs[d].max_new_tokens or s.max_new_tokens, max_turns=s.max_turns)
        res = score_samples(scorer, specs[d], samples, f"OPD student eval, domain {d!r}")
        out[d] = sum(res) / max(len(res), 1)
    return out


def _rollout_scores(scorer, specs, samples) -> list[float]:
    """Each OPD rollout's verifier score, by its route's verifier (the reward term)."""
    from engine.episode import score_samples

    by_route: dict[str, list[int]] = {}
    for i, smp in enumerate(samples):
        by_route.setdefault(smp.route, []).append(i)
    out = [0.0] * len(samples)
    for d, idx in sorted(by_route.items()):
        for i, x in zip(idx, score_samples(scorer, specs[d], [samples[i] for i in idx], f"OPD rollouts, route {d!r}")):
            out[i] = float(x)
    return out


def opd(ctx: StageContext) -> dict:
    from distill.heads import assert_same_vocab, extract_head
    from distill.opd import TeacherRef, run_opd
    from engine.checkpoint import CheckpointManager
    from engine.domain_spec import DomainSpec
    from engine.generation import build_generator
    from engine.model import load_model

    cfg = ctx.cfg
    s = cfg.opd
    device = cfg.trainer.device  # teacher prefill and held-out KL run on the stage's device
    init = s.student_init
    student_dir = ctx.model_dir("prepare" if init == "base" else init) if (init == "base" or init.startswith("sft:")) else init
    from pipeline.graph import grpo_stage

    teachers = [TeacherRef(i, t.path or grpo_stage(t.domain, t.mode), t.domain,
                           t.path or ctx.model_dir(grpo_stage(t.domain, t.mode)), t.weight, t.mode, t.share)
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
    by_domain = domain_spec_map(ctx, sorted({t.domain for t in teachers}), tokenizer)
    specs = {t.route: DomainSpec(verifier=by_domain[t.domain][0], environment=by_domain[t.domain][1],
                                 max_new_tokens=cfg.domain(t.domain).modes[t.mode].max_new_tokens if t.mode else None)
             for t in teachers}

    def route_rows(t, split):
        return [r for r in prepared_rows(ctx, t.domain, split) if t.mode is None or r.get("mode") == t.mode]

    prompts = {t.route: route_rows(t, "train") for t in teachers}
    total = opd_total_steps(s, len(teachers))
    trainer = make_trainer(ctx, student_dir, lr=s.lr, weight_decay=s.weight_decay, grad_clip=s.grad_clip,
                           schedule=s.lr_schedule, total_steps=None if s.lr_schedule == "constant" else total,
                           warmup_steps=0, seed=s.seed)
    generator = build_generator(cfg.generator, student_dir, tokenizer=tokenizer, dtype=cfg.model.dtype)
    logger = stage_logger(ctx, total, s.model_dump())
    checkpoints = CheckpointManager(ctx.out_dir / "checkpoints", keep_last=2)
    # verifiers mostly wait on sandboxed subprocesses (code): at least two workers, as in eval
    scorer = scorer_pool(cfg, max(2, int(cfg.resources_for(ctx.stage.name).num_cpus)))
    prefill = None
    from pipeline.config import teach_resources

    teach, per_domain = teach_resources(cfg)  # the teach phase (and held-out KL prefill) on Ray tasks
    if teach is not None:
        from pipeline.actors import TeacherPrefillPool, join_ray

        join_ray()
        prefill = TeacherPrefillPool(dtype=cfg.model.dtype, device=device, num_cpus=teach.num_cpus,
                                     num_gpus=teach.num_gpus,
                                     per_teacher={t.index: (per_domain[t.domain].num_cpus, per_domain[t.domain].num_gpus)
                                                  for t in teachers if t.domain in per_domain})
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
                          prefill=prefill,
                          score_rollouts=(lambda smp: _rollout_scores(scorer, specs, smp)) if s.reward_weight else None)
    finally:
        scorer.close()
        generator.close()
        close_workers(trainer, logger)
    latest = checkpoints.latest()
    return {"outputs": {"model": str(latest), "final": export_stage(ctx, latest, tokenizer)}, "metrics": history}
