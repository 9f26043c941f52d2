"""What a stage knows of its domains: the rows `prepare` wrote, and each domain's verifier
and tool environment (the one place GRPO, mixed RL, OPD and eval get them)."""

from __future__ import annotations

from pipeline.stage_context import StageContext


def prepared_rows(ctx: StageContext, domain: str, split: str) -> list[dict]:
    """The rows `prepare` wrote for `domain` and `split` ("train" or "eval")."""
    from engine.data import load_rows

    return load_rows(ctx.run.output("prepare", f"data:{domain}:{split}"), on_bad_row="error")


def domain_environment(cfg, name: str, rows: list[dict], tokenizer):
    """The tool environment of a multi-turn domain, None for single-turn ones: the one the
    domain's `environment` names (each row's own tools, or the user's factory called with
    each row's reference); else a synthetic domain's own; for real tool rows (`tool`
    verifier, `grpo.max_turns` > 1) each row's own tools (engine.row_tools). Training, OPD
    and eval all take it from here."""
    from engine.domains import get_domain

    d = cfg.domain(name)
    if d.environment is not None:  # 'row_tools' or the user's `package.module:function` (per row)
        from engine.plugins import is_import_path, load_object
        from engine.row_tools import RowEnvironments

        factory = load_object(d.environment, "tool environment") if is_import_path(d.environment) else None
        return RowEnvironments(rows, tokenizer, factory=factory)
    if d.data.synthetic is not None:
        return get_domain(d.data.synthetic.generator).environment()
    if d.verifier == "tool" and d.grpo.max_turns > 1:
        from engine.row_tools import RowEnvironments

        return RowEnvironments(rows, tokenizer)
    return None


def domain_spec_map(ctx: StageContext, names, tokenizer):
    """Verifier and tool environment of each domain (environment only for multi-turn ones)."""
    out = {}
    for n in names:
        rows = prepared_rows(ctx, n, "train") + prepared_rows(ctx, n, "eval")
        out[n] = (ctx.cfg.domain(n).verifier, domain_environment(ctx.cfg, n, rows, tokenizer))
    return out
