"""The `report` stage: `report/report.md` and its plots from the run directory."""

from __future__ import annotations

from pipeline.stage_context import StageContext


def report(ctx: StageContext) -> dict:
    """`report/report.md` + plots from everything in the run directory."""
    from pipeline.report import write_report

    path = write_report(ctx.run.root)
    _log_tables(ctx)
    return {"outputs": {"report": str(path)}}


def _log_tables(ctx: StageContext) -> None:
    """The report's results tables (greedy, sampled pass@1) to the report stage's wandb run."""
    import json

    from pipeline.stage_workers import stage_logger

    results_path = ctx.run.root / "eval" / "results.json"
    if ctx.cfg.logging.wandb == "disabled" or not results_path.is_file():
        return
    results = json.loads(results_path.read_text())
    logger = stage_logger(ctx, None, {}, filename=None)
    try:
        for key in ("models", "sampled"):
            table = results.get(key) or {}
            logger.log_table(f"report/{'greedy' if key == 'models' else 'pass@1'}",
                             [{"model": m, **by_d} for m, by_d in table.items()])
    finally:
        logger.close()
