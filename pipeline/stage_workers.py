"""The workers a stage hands its driver, built from the config: a trainer (one local rank or a
Ray actor group of data-parallel ranks), the metrics logger, and the verifier scorer pool.
This module is the only place that decides whether a trainer is local or a Ray group."""

from __future__ import annotations

from pipeline.stage_context import StageContext


def make_trainer(ctx: StageContext, init_dir: str, **overrides):
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


def wandb_run_id(ctx: StageContext) -> str:
    """One wandb run per (run directory, stage, input hash): a resumed attempt continues it,
    a changed config starts another. wandb ids allow letters, digits, '-' and '_'."""
    import hashlib
    import re

    key = f"{ctx.run.root.resolve()}|{ctx.stage.name}|{ctx.input_hash}"
    return re.sub(r"[^A-Za-z0-9_-]", "-", ctx.stage.name)[:40] + "-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def stage_logger(ctx: StageContext, total_steps: int | None, start_config: dict,
                 filename: str | None = "metrics.jsonl"):
    """The stage's MetricsLogger: metrics.jsonl, progress, samples, and its wandb run (the
    experiment's group, the stage kind as job type, a stable id)."""
    from engine.metrics import MetricsLogger

    cfg = ctx.cfg
    return MetricsLogger(ctx.out_dir, total_steps=total_steps, wandb_mode=cfg.logging.wandb,
                         project=cfg.logging.project, run_name=f"{cfg.experiment}/{ctx.stage.name}",
                         config={**start_config, "input_hash": ctx.input_hash},
                         progress=cfg.logging.progress and total_steps is not None, filename=filename,
                         group=cfg.experiment, job_type=ctx.stage.kind, run_id=wandb_run_id(ctx),
                         samples_per_step=cfg.logging.samples_per_step)


def close_workers(trainer, logger) -> None:
    logger.close()
    if hasattr(trainer, "shutdown"):
        trainer.shutdown()


def scorer_pool(cfg, num_workers: int):
    """A `ScorerPool` with the config's code sandbox mode; `unsafe-local` is said in the stage log."""
    from rewards import ScorerPool

    if cfg.sandbox == "unsafe-local":
        print("WARNING: sandbox: unsafe-local: code completions run UNISOLATED on this machine "
              "(no namespaces, no throwaway uid)", flush=True)
    return ScorerPool(num_workers=num_workers, sandbox=cfg.sandbox, max_error_rate=cfg.max_verifier_error_rate)


def checked_scores(pool, where: str):
    """`score(verifier, texts, refs, row_ids=None) -> [float]` over `pool`, raising when the
    verifier failed on the pool's `max_error_rate` of a batch
    (`rewards.batch.check_verifier_errors`); a row scored 0 without a verdict is a line in
    the stage log naming its id (`row_ids`, aligned with `texts`)."""
    from engine.episode import verified_scores

    def score(verifier, texts, refs, row_ids=None):
        return verified_scores(pool, verifier, texts, refs, where, row_ids)

    return score
