"""Files the pipeline writes follow the process umask like any other tool's: an atomic
write (`mkstemp`, private 0600 by itself), a stage manifest, and an exported `final/`
model built from a real checkpoint."""

import os
import stat

import pytest
import torch

from engine.atomic import atomic_write_json, current_umask
from pipeline.rundir import RunDir

torch.set_num_threads(1)


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_without_changing(umask):
    assert current_umask() == umask
    assert current_umask() == umask


def test_atomic_writes_and_manifests_follow_the_umask(tmp_path, umask):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    RunDir(tmp_path / "run").write_manifest("sft:math", status="done")
    with open(tmp_path / "plain", "w") as f:  # what open() gives: the reference
        f.write("x")
    expected = 0o666 & ~umask
    assert _mode(tmp_path / "plain") == expected
    assert _mode(tmp_path / "a.json") == expected
    assert _mode(tmp_path / "run" / "sft-math" / "manifest.json") == expected
    assert not list(tmp_path.glob(".a.json.*"))  # no temporary left behind


def test_exported_model_is_readable_as_the_umask_allows(tmp_path):
    umask = 0o027
    old = os.umask(umask)
    try:
        _export_and_check(tmp_path, umask)
    finally:
        os.umask(old)


def _export_and_check(tmp_path, umask):
    from engine.checkpoint import CheckpointManager
    from engine.export import export_final
    from engine.model import TinySpec, load_tokenizer, materialize_tiny
    from engine.trainer import TrainerSettings, build_trainer

    base = materialize_tiny(TinySpec(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                     intermediate_size=32), tmp_path / "base", seed=0)
    trainer = build_trainer(TrainerSettings(), base)
    ckpt = CheckpointManager(tmp_path / "checkpoints").save(trainer, 1, {"step": 1})
    final = export_final(ckpt, tmp_path / "final", load_tokenizer(base))
    files = [p for p in final.iterdir() if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files)
    assert {p.name: _mode(p) for p in files} == {p.name: 0o666 & ~umask for p in files}
    assert _mode(final) == 0o777 & ~umask
