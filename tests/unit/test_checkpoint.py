"""CheckpointManager (temp dir + rename, `latest`, retention) and the torch trainer's exact
checkpoint round trip."""

import json
import os

import pytest
import torch

from engine.checkpoint import CheckpointManager

torch.set_num_threads(1)


class FakeTrainer:
    def __init__(self, fail_at=None):
        self.fail_at = fail_at
        self.saved = []

    def save_checkpoint(self, path, extra_state):
        assert path.name.endswith(".tmp")  # never written in place
        (path / "extra_state.json").write_text(json.dumps(extra_state))
        if extra_state["step"] == self.fail_at:
            raise OSError("disk full")
        self.saved.append(path)


def test_save_latest_and_retention(tmp_path):
    cm = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    assert cm.latest() is None
    for step in (2, 4, 6):
        out = cm.save(FakeTrainer(), step, {"step": step})
        assert out == tmp_path / "ckpt" / f"step-{step}"
    assert cm.steps() == [4, 6]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step-6"
    assert cm.latest() == tmp_path / "ckpt" / "step-6"
    assert not list((tmp_path / "ckpt").glob(".*tmp"))


def test_failed_save_keeps_previous_and_is_cleaned(tmp_path):
    cm = CheckpointManager(tmp_path / "c", keep_last=3)
    cm.save(FakeTrainer(), 1, {"step": 1})
    with pytest.raises(OSError, match="saving checkpoint step 2 to .*step-2 failed: disk full"):
        cm.save(FakeTrainer(fail_at=2), 2, {"step": 2})
    assert cm.latest().name == "step-1" and cm.steps() == [1]
    assert not (tmp_path / "c" / ".step-2.tmp").exists()  # a failed save frees its partial write
    (tmp_path / "c" / ".step-2.tmp").mkdir()  # what a killed writer leaves
    (tmp_path / "c" / ".step-2.tmp" / "extra_state.json").write_text("{")
    CheckpointManager(tmp_path / "c")  # the next run removes it
    assert not (tmp_path / "c" / ".step-2.tmp").exists()


def test_latest_falls_back_to_newest_and_resave(tmp_path):
    cm = CheckpointManager(tmp_path / "c", keep_last=5)
    cm.save(FakeTrainer(), 3, {"step": 3})
    cm.save(FakeTrainer(), 5, {"step": 5})
    (tmp_path / "c" / "latest").write_text("step-9\n")  # stale pointer
    assert cm.latest().name == "step-5"
    os.remove(tmp_path / "c" / "latest")
    assert cm.latest().name == "step-5"
    cm.save(FakeTrainer(), 5, {"step": 5, "again": True})  # a resumed run re-saving a step
    assert json.loads((tmp_path / "c" / "step-5" / "extra_state.json").read_text())["again"] is True
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path / "d", keep_last=0)


def _loss(hidden, weight, batch):
    from engine.logprobs import compute_chunked_token_logprobs

    lp = compute_chunked_token_logprobs(hidden, weight, batch["input_ids"], None)
    return -(lp * batch["loss_mask"]).sum() / batch["global_tokens"], {}


def _batches(seed):
    from engine.batching import Sample, build_step_batches

    g = torch.Generator().manual_seed(seed)
    s = [Sample(torch.randint(6, 90, (n,), generator=g).tolist(), [0, 0] + [1] * (n - 2)) for n in (6, 9, 5)]
    return build_step_batches(s, micro_batch_size=2, pad_id=0)


@pytest.mark.parametrize("optimizer,dtype", [("adamw", "fp32"), ("muon", "fp32"), ("muon", "bf16")])
def test_torch_trainer_checkpoint_round_trip_is_exact(tmp_path, optimizer, dtype):
    from transformers import AutoModelForCausalLM

    from engine.model import TinySpec, materialize_tiny
    from engine.trainer import TrainerSettings, build_trainer

    d = materialize_tiny(TinySpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64),
                         tmp_path / "m", seed=0)
    s = TrainerSettings(optimizer=optimizer, lr=5e-3, schedule="cosine", warmup_steps=1, total_steps=6, dtype=dtype)
    a = build_trainer(s, d)
    for i in range(2):
        a.train_step(_batches(i), _loss)
    cm = CheckpointManager(tmp_path / "ck")
    path = cm.save(a, 2, {"step": 2, "cursor": {"epoch": 0}})
    for i in range(2, 4):
        a.train_step(_batches(i), _loss)
    b = build_trainer(s, d)
    assert b.load_checkpoint(cm.latest()) == {"step": 2, "cursor": {"epoch": 0}}
    for i in range(2, 4):
        b.train_step(_batches(i), _loss)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], atol=0, rtol=0, msg=k)
    assert all(v.dtype == torch.float32 for v in b.state_dict().values())  # bf16: the fp32 masters
    for (k, v), w in zip(a.compute_lm.state_dict().items(), b.compute_lm.state_dict().values()):
        assert v.dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
        torch.testing.assert_close(v, w, atol=0, rtol=0, msg=k)
    # the checkpoint is a plain HF directory
    lm = AutoModelForCausalLM.from_pretrained(str(path))
    assert (path / "tokenizer.json").exists() and lm.config.vocab_size == a.lm.config.vocab_size
