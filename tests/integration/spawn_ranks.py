"""Two (or n) local gloo ranks for a test: `target(rank, port, *args)` in spawned processes."""

from __future__ import annotations

import multiprocessing


def run_ranks(target, *args, n: int = 2, timeout: float = 300) -> None:
    """Start `target(rank, port, *args)` for rank 0..n-1 (spawn context, a free port on
    127.0.0.1), wait up to `timeout` s for each, and fail unless every rank exited 0."""
    from engine.trainer_deepspeed import free_port

    ctx = multiprocessing.get_context("spawn")
    port = free_port("127.0.0.1")
    procs = [ctx.Process(target=target, args=(r, port, *args)) for r in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
