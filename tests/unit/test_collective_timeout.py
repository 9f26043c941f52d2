"""A rank whose peer never joins a collective raises after `POLYMATH_COLLECTIVE_TIMEOUT_S`
instead of waiting torch's default 30 minutes (gloo, two local processes)."""

import multiprocessing
import os
import time

import pytest

from engine.trainer_common import collective_timeout_s
from engine.trainer_deepspeed import free_port


def _rank(rank: int, port: int, timeout_s: str, out) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "POLYMATH_COLLECTIVE_TIMEOUT_S": timeout_s})
    import torch
    import torch.distributed as dist

    from engine.trainer_common import init_process_group

    init_process_group(rank, 2, "cpu")
    if rank == 1:
        time.sleep(30)  # alive, never joins the all-reduce
        return
    t0 = time.monotonic()
    try:
        dist.all_reduce(torch.ones(3))
        out.put(("returned", time.monotonic() - t0))
    except Exception as exc:  # noqa: BLE001 -- what the test inspects
        out.put((f"{type(exc).__name__}: {exc}"[:300], time.monotonic() - t0))


def test_a_collective_without_its_peer_times_out():
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    port = free_port("127.0.0.1")
    procs = [ctx.Process(target=_rank, args=(r, port, "3", out), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        what, seconds = out.get(timeout=60)
    finally:
        for p in procs:
            p.kill()
    assert what != "returned", "all_reduce returned without its peer"
    assert 2.0 <= seconds < 20.0, (what, seconds)


@pytest.mark.parametrize("raw", ["0", "-5", "ten"])
def test_a_bad_timeout_is_refused_by_name(monkeypatch, raw):
    monkeypatch.setenv("POLYMATH_COLLECTIVE_TIMEOUT_S", raw)
    with pytest.raises(ValueError, match="POLYMATH_COLLECTIVE_TIMEOUT_S"):
        collective_timeout_s()


def test_the_default_is_ten_minutes(monkeypatch):
    monkeypatch.delenv("POLYMATH_COLLECTIVE_TIMEOUT_S", raising=False)
    assert collective_timeout_s() == 600.0
