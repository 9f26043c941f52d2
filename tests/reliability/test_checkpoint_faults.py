"""Checkpoint faults: a write error (disk full) at each point of `CheckpointManager.save`
leaves the previous checkpoint valid, loadable and named by `latest`, and a rerun
continues; a truncated or bit-flipped checkpoint file is detected on load, naming the file.

Disk full is injected as `OSError(ENOSPC)` raised after part of the file was written
(the way a real `write` fails: the message carries no file name), at: the safetensors
weights, the optimizer state (`torch.save`), the rename of the temporary directory, and
the rewrite of `latest`. Corruption is found by `CheckpointManager.latest()`, which checks
every file against the `checksums.json` written with the checkpoint.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

import engine.checkpoint as ckpt_mod
from engine.batching import Sample, build_step_batches
from engine.checkpoint import CheckpointManager
from engine.model import TinySpec, materialize_tiny
from engine.trainer import TrainerSettings, build_trainer
from experts.sft import SFTLoss

torch.set_num_threads(1)
SPEC = TinySpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return materialize_tiny(SPEC, tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


def _step(trainer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    samples = [Sample(torch.randint(6, 80, (9,), generator=g).tolist(), [0, 0] + [1] * 7) for _ in range(4)]
    trainer.train_step(build_step_batches(samples, micro_batch_size=2, pad_id=0), SFTLoss())


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def saved(model_dir, tmp_path):
    """A trainer after 1 step with its checkpoint step-1 saved, then one more step taken."""
    trainer = build_trainer(TrainerSettings(lr=1e-2), model_dir)
    _step(trainer, 1)
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    manager.save(trainer, 1, {"step": 1, "cursor": 4})
    state1 = trainer.state_dict()
    _step(trainer, 2)
    return trainer, manager, state1


def _partial_write_then_enospc(real):
    """Wrap a writer `(obj, path, ...)`: write half of what it would, then fail like a full disk."""
    def fail(obj, path, *args, **kwargs):
        real(obj, path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError(ENOSPC.errno, ENOSPC.strerror)
    return fail


def _inject(kind: str, monkeypatch) -> None:
    if kind == "weights":
        import transformers.modeling_utils as mu

        monkeypatch.setattr(mu, "safe_save_file", _partial_write_then_enospc(mu.safe_save_file))
    elif kind == "optimizer_state":
        monkeypatch.setattr(torch, "save", _partial_write_then_enospc(torch.save))
    elif kind == "rename":
        def replace(src, dst):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    elif kind == "latest_pointer":
        def write(path, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(ckpt_mod, "atomic_write_text", write)


@pytest.mark.parametrize("kind", ["weights", "optimizer_state", "rename", "latest_pointer"])
def test_disk_full_keeps_the_previous_checkpoint_and_a_rerun_continues(kind, saved, model_dir, monkeypatch,
                                                                       fault_log):
    trainer, manager, state1 = saved
    with monkeypatch.context() as mp:
        _inject(kind, mp)
        with pytest.raises(OSError) as info:
            manager.save(trainer, 2, {"step": 2, "cursor": 8})
    assert info.value.errno == errno.ENOSPC
    # the previous checkpoint is intact, `latest` (re-read by a fresh manager, as a
    # restarted process would) still names it, and it loads to exactly the saved state
    fresh = CheckpointManager(manager.root, keep_last=2)
    assert fresh.latest() == manager.path(1)
    assert (manager.root / "latest").read_text().strip() == "step-1"
    assert not list(manager.root.glob(".step-*.tmp"))  # a restart removes the partial write
    loader = build_trainer(TrainerSettings(lr=1e-2), model_dir)
    assert loader.load_checkpoint(fresh.latest()) == {"step": 1, "cursor": 4}
    assert _equal(loader.state_dict(), state1)
    # the rerun saves step 2 and continues from it
    fresh.save(trainer, 2, {"step": 2, "cursor": 8})
    assert fresh.latest() == fresh.path(2) and fresh.steps() == [1, 2]
    again = build_trainer(TrainerSettings(lr=1e-2), model_dir)
    assert again.load_checkpoint(fresh.latest())["step"] == 2
    assert _equal(again.state_dict(), trainer.state_dict())
    fault_log(f"disk full while saving a checkpoint ({kind})", "recovered")


@pytest.mark.parametrize("kind", ["weights", "optimizer_state", "rename"])
def test_disk_full_error_names_the_checkpoint_and_frees_the_partial_write(kind, saved, monkeypatch, fault_log):
    trainer, manager, _ = saved
    with monkeypatch.context() as mp:
        _inject(kind, mp)
        with pytest.raises(OSError) as info:
            manager.save(trainer, 2, {"step": 2})
    assert info.value.errno == errno.ENOSPC
    assert f"saving checkpoint step 2 to {manager.path(2)} failed" in str(info.value), info.value
    assert not list(manager.root.glob(".step-*.tmp"))  # freed at once, not at the next start
    fault_log(f"disk-full error ({kind}) names the checkpoint, partial write freed", "detected")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 9] ^= 0x10  # a bit near the end: inside the last tensor's payload / the JSON
    path.write_bytes(bytes(data))


CORRUPTIONS = [("model.safetensors", "truncate"), ("trainer_state.pt", "truncate"),
               ("extra_state.json", "truncate"), ("model.safetensors", "bitflip"), ("extra_state.json", "bitflip"),
               ("checksums.json", "truncate")]


@pytest.mark.parametrize("name,how", CORRUPTIONS, ids=[f"{n}-{h}" for n, h in CORRUPTIONS])
def test_corrupt_checkpoint_file_detected_naming_the_file(name, how, saved, model_dir, fault_log):
    """`latest()` verifies the checksums: the only checkpoint being corrupt, it refuses it."""
    trainer, manager, state1 = saved
    path = manager.latest() / name
    (_truncate if how == "truncate" else _flip)(path)
    loader = build_trainer(TrainerSettings(lr=1e-2), model_dir)
    outcome = "undetected"
    try:
        extra = loader.load_checkpoint(manager.latest())
    except Exception as exc:  # noqa: BLE001 -- any error is detection; naming the file is the check
        outcome = "detected"
        message = f"{type(exc).__name__}: {exc}"
    else:
        message = f"loaded silently: extra={extra}, weights equal: {_equal(loader.state_dict(), state1)}"
    fault_log(f"{how} {name}", outcome)
    assert outcome == "detected" and name in message, message


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(saved, model_dir, caplog, fault_log):
    trainer, manager, state1 = saved
    manager.save(trainer, 2, {"step": 2, "cursor": 8})
    assert manager.latest() == manager.path(2)
    _flip(manager.path(2) / "model.safetensors")
    with caplog.at_level("WARNING", logger="engine.checkpoint"):
        assert CheckpointManager(manager.root, keep_last=2).latest() == manager.path(1)
    assert "step-2/model.safetensors: sha256 differs" in caplog.text
    loader = build_trainer(TrainerSettings(lr=1e-2), model_dir)
    assert loader.load_checkpoint(manager.latest()) == {"step": 1, "cursor": 4}
    assert _equal(loader.state_dict(), state1)
    fault_log("bit flip in the newest checkpoint: resumed from the previous one", "recovered")


def test_checkpoint_without_checksums_still_loads(saved, model_dir, caplog):
    """A checkpoint written before checksums existed is accepted, with a warning."""
    _, manager, state1 = saved
    (manager.path(1) / "checksums.json").unlink()
    with caplog.at_level("WARNING", logger="engine.checkpoint"):
        assert manager.latest() == manager.path(1)
    assert "not verified" in caplog.text
