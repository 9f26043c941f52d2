"""Matplotlib for the report's plots: a headless backend, PNGs written temp-then-rename."""

from __future__ import annotations

import io
import os
from pathlib import Path

from engine.atomic import atomic_write_bytes


def save_png(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def pyplot():
    os.environ.setdefault("MPLCONFIGDIR", str(Path.cwd() / ".cache" / "matplotlib"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
