"""`validate`'s look at the data: the first rows of every data source, read through the
domain's field mapping, adapter and reference check, so a missing field or a wrong
adapter is an error naming the field, the file and the row before any stage runs
(`prepare` then checks every row, engine.data.split_problem)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

FIRST_ROWS = 16


def data_errors(cfg, base: Path, first: int = FIRST_ROWS) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(errors, warnings) as `(yaml path, reason)`: an error where a split's first `first`
    rows are mostly bad (or there are none), a warning for a few bad ones among them, or
    for a hub dataset that cannot be read here."""
    from engine.data import bad_rows_summary, read_rows
    from pipeline.config import HFData, resolve_path
    from pipeline.stage_io import data_source
    from rewards import check_reference

    errors: list[tuple[str, str]] = []
    warnings: list[tuple[str, str]] = []
    for i, d in enumerate(cfg.domains):
        if d.data.synthetic is not None:
            continue
        for split in ("train", "eval"):
            where = f"domains[{i}].data.{split}"
            spec = getattr(d.data, split)
            try:
                result = read_rows(data_source(spec, base), adapter=d.data.adapter, domain=d.name,
                                   fields=d.data.fields, check_reference=partial(check_reference, d.verifier),
                                   limit=first)
            except Exception as exc:  # noqa: BLE001 - any reader failure is reported with its source
                local = not isinstance(spec, HFData) or resolve_path(spec.hf.path, base).exists() or spec.hf.data_files
                (errors if local else warnings).append(
                    (where, f"cannot read{'' if local else ' here (checked again in prepare)'}: "
                            f"{type(exc).__name__}: {str(exc)[:500]}"))
                continue
            total = len(result.rows) + len(result.bad)
            adapter = f"adapter {d.data.adapter!r}" if d.data.adapter else "no adapter (rows in our format)"
            if total == 0:
                errors.append((where, "no rows (the source is empty)"))
            elif not result.rows or 2 * len(result.bad) > total:
                errors.append((where, f"the first {total} rows read with {adapter}: "
                                      f"{bad_rows_summary(result.bad, total, first=1)}"))
            elif result.bad:
                warnings.append((where, f"the first {total} rows: {bad_rows_summary(result.bad, total)}"))
    return errors, warnings
