"""The `report` stage: `report/report.md` and its plots from the run directory."""

from __future__ import annotations

from pipeline.stage_context import StageContext


def report(ctx: StageContext) -> dict:
    """`report/report.md` + plots from everything in the run directory."""
    from pipeline.report import write_report

    path = write_report(ctx.run.root)
    return {"outputs": {"report": str(path)}}
