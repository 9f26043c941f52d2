"""The `grpo:<domain>` and `mixed_rl` stages: GRPO (`experts.grpo`) on one domain from its
SFT expert, or on every domain at once from the student's SFT start (the baseline)."""

from __future__ import annotations

from pipeline.stage_context import StageContext
from pipeline.stage_domains import domain_spec_map, prepared_rows
from pipeline.stage_io import export_stage, stage_tokenizer
from pipeline.stage_workers import close_workers, make_trainer, scorer_pool, stage_logger


def _run_grpo_stage(ctx: StageContext, settings, init_dir: str, names: list[str], mode: str | None = None) -> dict:
    from engine.checkpoint import CheckpointManager
    from engine.generation import build_generator
    from engine.domain_spec import DomainSpec
    from experts.grpo import run_grpo

    cfg = ctx.cfg
    tokenizer = stage_tokenizer(cfg, init_dir)
    train = [r for n in names for r in prepared_rows(ctx, n, "train") if mode is None or r.get("mode") == mode]
    specs = {n: DomainSpec(verifier=v, environment=e, modes=cfg.domain(n).modes)
             for n, (v, e) in domain_spec_map(ctx, names, tokenizer).items()}
    trainer = make_trainer(ctx, init_dir, lr=settings.lr, weight_decay=settings.weight_decay,
                           warmup_steps=settings.warmup_steps, grad_clip=settings.grad_clip,
                           schedule="constant", total_steps=None, seed=settings.seed)
    reference = None
    if settings.kl_beta > 0:
        from engine.trainer import build_trainer, with_overrides

        reference = build_trainer(with_overrides(cfg.trainer, seed=settings.seed), init_dir)
    generator = build_generator(cfg.generator, init_dir, tokenizer=tokenizer, dtype=cfg.model.dtype)
    logger = stage_logger(ctx, settings.steps, settings.model_dump())
    checkpoints = CheckpointManager(ctx.out_dir / "checkpoints", keep_last=settings.keep_last)
    scorer = scorer_pool(cfg, max(1, int(cfg.resources_for(ctx.stage.name).num_cpus)))
    try:
        final = run_grpo(settings, trainer=trainer, generator=generator, scorer=scorer, tokenizer=tokenizer,
                         train_rows=train,
                         domains=specs, out_dir=ctx.out_dir, reference=reference, logger=logger,
                         checkpoints=checkpoints)
    finally:
        scorer.close()
        generator.close()
        close_workers(trainer, logger)
    keep = ("reward_mean", "train/loss", "train/clip_frac_high", "train/approx_kl", "response_len")
    latest = checkpoints.latest()
    return {"outputs": {"model": str(latest), "final": export_stage(ctx, latest, tokenizer)},
            "metrics": {k: v for k, v in final.items()
                        if k in keep or k.startswith(("reward/", "rollout_wal/", "scoring/"))},
            **({"note": final["note"]} if final.get("note") else {})}


def grpo(ctx: StageContext) -> dict:
    """`grpo:<domain>`, or `grpo:<domain>@<mode>`: that mode's rows only, its budget and reward shaping."""
    from engine.modes import split_route

    d, mode = split_route(ctx.stage.name.split(":", 1)[1])
    settings = ctx.cfg.domain(d).expert_grpo(mode)
    return _run_grpo_stage(ctx, settings, ctx.model_dir(ctx.cfg.expert_start(d)), [d], mode=mode)


def mixed_rl(ctx: StageContext) -> dict:
    """One GRPO run on every domain at once, from the OPD student's SFT start: the baseline."""
    return _run_grpo_stage(ctx, ctx.cfg.mixed_rl.grpo, ctx.model_dir("sft:all"), ctx.cfg.domain_names)
