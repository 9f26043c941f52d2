"""Disk use of a directory tree (stdlib only: the report imports it without torch)."""

from __future__ import annotations

import os
from pathlib import Path


def dir_bytes(path: str | os.PathLike) -> int:
    """Bytes the tree under `path` occupies on disk (allocated blocks; 0 if it is absent).
    Files deleted while it walks are skipped."""
    total = 0
    for root, _dirs, files in os.walk(Path(path)):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


def storage_read_bytes() -> int | None:
    """Bytes this process has fetched from storage (page-cache misses, all its threads),
    from /proc/self/io; None where there is no such file."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None
