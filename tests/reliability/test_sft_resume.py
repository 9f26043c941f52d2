"""Kill-and-resume: an SFT run SIGKILLed after its first checkpoint and started again in
the same directory ends with bitwise the same weights as a run never interrupted, and
logs every step exactly once with the same losses (no sample repeated or skipped).
Both trainer backends; the runs are subprocesses (`CHILD` below)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from engine.model import TinySpec, materialize_tiny

CHILD = r'''
import sys, time, torch
torch.set_num_threads(1)
from engine.domains import get_domain
from engine.metrics import MetricsLogger
from engine.model import load_tokenizer
from engine.trainer import TrainerSettings, build_trainer, with_overrides
from experts.sft import SFTSettings, run_sft

backend, model_dir, out_dir, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
settings = SFTSettings(steps=8, batch_size=8, micro_batch_size=3, max_length=64, pack=backend == "deepspeed",
                       lr=5e-3, warmup_steps=2, save_every=3, keep_last=2)
trainer = build_trainer(with_overrides(TrainerSettings(backend=backend), **settings.trainer_overrides()), model_dir)

class Slow:  # gives the test time to kill the run between checkpoints
    def __init__(self, inner): self.inner = inner
    def __getattr__(self, name): return getattr(self.inner, name)
    def train_step(self, mbs, fn):
        out = self.inner.train_step(mbs, fn)
        time.sleep(delay)
        return out

rows = get_domain("math").generate("train", 36, seed=1)  # 8 x 8 samples cross two epochs
logger = MetricsLogger(out_dir, wandb_mode="disabled", progress=False)
run_sft(settings, trainer=Slow(trainer), tokenizer=load_tokenizer(model_dir), train_rows=rows, out_dir=out_dir,
        logger=logger)
logger.close()
print("FINISHED")
'''


def _run(args, **kw):
    return subprocess.Popen([sys.executable, "-c", CHILD, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _weights(step_dir):
    from safetensors.torch import load_file

    return load_file(str(step_dir / "model.safetensors"))


def _losses(out_dir):
    return [(r["step"], r["loss"]) for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, backend):
    model_dir = materialize_tiny(TinySpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                          intermediate_size=64), tmp_path / "tiny", seed=0)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    reference = _run([backend, model_dir, ref_dir, 0])
    killed = _run([backend, model_dir, run_dir, 0.4])
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not latest.exists():
        assert killed.poll() is None, killed.communicate()[0][-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    assert killed.poll() is None  # still running: killed between checkpoints
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (run_dir / "checkpoints" / "step-8").exists()
    first = latest.read_text().strip()
    out, _ = reference.communicate(timeout=180)
    assert reference.returncode == 0 and "FINISHED" in out, out[-3000:]
    resumed = _run([backend, model_dir, run_dir, 0])
    out, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0 and "FINISHED" in out, out[-3000:]

    a, b = _weights(ref_dir / "checkpoints" / "step-8"), _weights(run_dir / "checkpoints" / "step-8")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume from {first}"
    # each step logged once, same losses: the resumed run read exactly the same samples
    assert _losses(run_dir) == _losses(ref_dir) and [s for s, _ in _losses(ref_dir)] == list(range(1, 9))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-")) == \
        ["step-6", "step-8"]
