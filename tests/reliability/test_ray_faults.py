"""Ray faults: a trainer rank actor of a `pipeline.actors.TrainerGroup` killed mid-stage
makes the next `train_step` fail with a clear error, bounded in time (no hang).

Two DeepSpeed ranks (ZeRO 0, gloo on CPU) take one healthy step; then rank 1 is killed
with `ray.kill` and the next step must raise within `DEADLINE_S`. A surviving rank that
blocks in a gloo collective waiting for its dead peer is the hang this test guards
against. Stage-level retries of a killed stage process are covered by
test_runner_resume.py.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from engine.batching import Sample, build_step_batches
from engine.model import TinySpec, materialize_tiny
from engine.trainer import TrainerSettings
from experts.sft import SFTLoss

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC = TinySpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
DEADLINE_S = 60.0
sft_loss = SFTLoss()


def _batches(seed: int):
    g = torch.Generator().manual_seed(seed)
    samples = [Sample(torch.randint(6, 80, (9,), generator=g).tolist(), [0, 0] + [1] * 7) for _ in range(4)]
    return build_step_batches(samples, micro_batch_size=2, pad_id=0)


def _call_bounded(fn, timeout: float):
    """(returned, raised, seconds); `raised` is None and `returned` is the sentinel on a hang."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 -- the error is what the test inspects
            box["error"] = exc

    t0 = time.monotonic()
    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(timeout)
    return box.get("value", "HANG" if th.is_alive() else None), box.get("error"), time.monotonic() - t0


@pytest.mark.slow
def test_killed_trainer_rank_fails_the_step_cleanly_without_hanging(tmp_path, fault_log):
    import ray

    from pipeline.actors import TrainerGroup

    model_dir = materialize_tiny(SPEC, tmp_path / "tiny", seed=0)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=os.path.join(ROOT, ".cache", "ray"))
    try:
        group = TrainerGroup(TrainerSettings(backend="deepspeed", zero_stage=0, lr=1e-2), model_dir, 2)
        healthy = group.train_step(_batches(0), sft_loss)
        assert healthy["num_micro_batches"] == 2
        ray.kill(group.ranks[1], no_restart=True)
        value, error, seconds = _call_bounded(lambda: group.train_step(_batches(1), sft_loss), DEADLINE_S)
        hung = value == "HANG"
        fault_log("ray.kill of trainer rank 1 before a step", "undetected" if hung or error is None else "detected")
        assert not hung, f"train_step still blocked {DEADLINE_S:.0f}s after a rank was killed"
        assert error is not None, f"train_step returned {value} with a dead rank"
        text = f"{type(error).__name__}: {error}"
        assert "ActorDied" in text or "actor died" in text.lower() or "RayActorError" in text, text
        print(f"failed in {seconds:.1f}s with {text[:200]}")
    finally:
        for a in getattr(locals().get("group"), "ranks", []):
            ray.kill(a)
        ray.shutdown()
