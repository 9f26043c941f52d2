"""The `sft:<domain>` and `sft:all` stages: supervised fine-tuning (`experts.sft`)."""

from __future__ import annotations

from pipeline.stage_context import StageContext
from pipeline.stage_domains import prepared_rows
from pipeline.stage_io import export_stage, stage_tokenizer
from pipeline.stage_workers import close_workers, make_trainer, stage_logger


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
    train = [r for n in names for r in prepared_rows(ctx, n, "train") if _has_demonstration(r)]
    evals = [r for n in names for r in prepared_rows(ctx, n, "eval") if _has_demonstration(r)]
    tokenizer = stage_tokenizer(cfg, base)
    if not train:  # nothing to imitate: the stage's model is the base model, unless SFT was asked for
        _require_no_demonstrations(cfg, target, names)
        print(f"[{ctx.stage.name}] no demonstrations in {names}: the base model is this stage's model", flush=True)
        return {"outputs": {"model": str(base), "final": export_stage(ctx, base, tokenizer)},
                "metrics": {"steps": 0, "skipped": "no demonstrations"}}
    trainer = make_trainer(ctx, base, **settings.trainer_overrides())
    logger = stage_logger(ctx, settings.steps, settings.model_dump())
    checkpoints = CheckpointManager(ctx.out_dir / "checkpoints", keep_last=settings.keep_last)
    try:
        result = run_sft(settings, trainer=trainer, tokenizer=tokenizer, train_rows=train, eval_rows=evals,
                         out_dir=ctx.out_dir, logger=logger, checkpoints=checkpoints)
    finally:
        close_workers(trainer, logger)
    latest = checkpoints.latest()
    return {"outputs": {"model": str(latest), "final": export_stage(ctx, latest, tokenizer)},
            "metrics": {"final_loss": result["final"].get("loss"), "eval_loss": result["final"].get("eval_loss"),
                        "steps": result["steps"]}}


def _has_demonstration(row: dict) -> bool:
    return any(m["role"] == "assistant" for m in row["messages"])


def _require_no_demonstrations(cfg, target: str, names: list[str]) -> None:
    """Raise when this SFT stage has settings of its own in the config (`domains[].sft`,
    or `student_sft` for sft:all) and a domain's data may carry demonstrations (an adapter
    not known to write none, IFEval's): exporting the untrained base model as the stage's
    result would hide a data problem."""
    from engine.adapters import adapter_demonstrations

    configured = "student_sft" in cfg.model_fields_set if target == "all" else "sft" in cfg.domain(target).model_fields_set
    expected = [n for n in names if cfg.domain(n).data.synthetic is None
                and adapter_demonstrations(cfg.domain(n).data.adapter) is not False]
    if configured and expected:
        raise RuntimeError(f"sft:{target} is configured but the training rows of {expected} hold no demonstrations "
                           "(no assistant message): check data.adapter / data.fields, or remove the sft settings")
