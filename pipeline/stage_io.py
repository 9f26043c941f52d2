"""What a stage reads and writes besides its driver's work: the tokenizer it renders with,
a domain's row source, and the `final/` export of its model."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import resolve_path
from pipeline.stage_context import StageContext


def data_source(spec, base: Path):
    """A row file path, or a `datasets` source dict with its local paths resolved."""
    if isinstance(spec, str):
        return resolve_path(spec, base)
    src = spec.hf.model_dump()
    files = src["data_files"]
    if files is not None:
        files = [files] if isinstance(files, str) else files
        src["data_files"] = [str(resolve_path(f, base)) for f in files]
    if resolve_path(src["path"], base).exists():
        src["path"] = str(resolve_path(src["path"], base))
    return src


def stage_tokenizer(cfg, model_dir: str | Path):
    """The tokenizer every stage renders with: `model.tokenizer` (default: the model's own,
    a directory or hub id) with `model.chat_template` replacing its template if set, and
    `model.reasoning_markers` as its reasoning markers if set (engine.reasoning)."""
    from engine.model import load_tokenizer
    from engine.reasoning import ReasoningMarkers, set_reasoning_markers

    template = cfg.model.chat_template
    tokenizer = load_tokenizer(cfg.model.tokenizer or model_dir,
                               chat_template=resolve_path(template, Path(".")) if template else None)
    if cfg.model.reasoning_markers is not None:  # else derived from the template (engine.reasoning)
        set_reasoning_markers(tokenizer, ReasoningMarkers(*cfg.model.reasoning_markers))
    return tokenizer


def export_stage(ctx: StageContext, checkpoint, tokenizer) -> str:
    """`<stage dir>/final/` from the stage's last checkpoint (engine.export)."""
    from engine.export import export_final

    if checkpoint is None:
        raise RuntimeError(f"stage {ctx.stage.name}: no checkpoint to export")
    if not Path(checkpoint).is_dir():  # a hub id (a stage without training data): save a local copy
        from engine.model import load_model

        local = ctx.out_dir / "hub-copy"
        load_model(checkpoint).save_pretrained(str(local))
        checkpoint = local
    return str(export_final(checkpoint, ctx.out_dir / "final", tokenizer))
