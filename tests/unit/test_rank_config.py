"""`validate` on trainer ranks: only stages that train take them; a CUDA rank needs a GPU."""

import pathlib

import pytest

from pipeline.config import ConfigError, load_config

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load(tmp_path, overrides):
    path = tmp_path / "c.yaml"
    path.write_text((ROOT / "configs" / "tiny.yaml").read_text())
    return load_config(path, overrides)


def test_two_ranks_on_a_trainer_stage_validate(tmp_path):
    cfg = _load(tmp_path, ["resources.stages.grpo:math={trainer_ranks: 2}", "trainer.backend=torch"])
    assert cfg.resources_for("grpo:math").trainer_ranks == 2
    cfg = _load(tmp_path, ["resources.stages.opd={trainer_ranks: 2}", "trainer.backend=deepspeed"])
    assert cfg.resources_for("opd").trainer_ranks == 2


@pytest.mark.parametrize("overrides,where", [
    (["resources.stages.eval={trainer_ranks: 2}"], "resources.stages.eval.trainer_ranks"),
    (["trainer.device=cuda", "resources.num_gpus=2", "resources.stages.sft={trainer_ranks: 2}"],
     "resources.stages.sft.num_gpus"),
])
def test_rank_errors_name_the_yaml_path(tmp_path, overrides, where):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, overrides)
    assert where in [p for p, _ in err.value.errors], err.value.errors


def test_cuda_teacher_prefill_needs_a_gpu_per_teacher(tmp_path):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, ["trainer.device=cuda", "resources.num_gpus=2", "resources.stages.teach={num_cpus: 1}"])
    assert "resources.stages.teach.num_gpus" in [p for p, _ in err.value.errors]
    _load(tmp_path, ["resources.stages.teach={num_cpus: 1}"])  # on CPU: fine


def test_per_teacher_prefill_resources(tmp_path):
    from pipeline.config import teach_resources

    assert teach_resources(_load(tmp_path, [])) == (None, {})  # tiny: the teach phase stays in-process
    cfg = _load(tmp_path, ["resources.stages.teach={num_cpus: 1}", "resources.stages.teach:code={num_cpus: 2}"])
    base, per = teach_resources(cfg)
    assert base.num_cpus == 1 and per["code"].num_cpus == 2 and set(per) == {"code"}
    base, per = teach_resources(_load(tmp_path, ["resources.stages.teach:math={num_cpus: 2}"]))
    assert base == cfg.resources.default and per["math"].num_cpus == 2  # the others take the default
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, ["resources.stages.teach:chess={num_cpus: 1}"])
    assert "resources.stages.teach:chess" in [p for p, _ in err.value.errors], err.value.errors
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, ["trainer.device=cuda", "resources.num_gpus=2", "resources.stages.teach:math={num_cpus: 1}"])
    assert "resources.stages.teach:math.num_gpus" in [p for p, _ in err.value.errors]


def test_pipelined_opd_in_bf16_needs_the_prefill_pool(tmp_path):
    _load(tmp_path, ["opd.pipelined=true"])  # fp32 (tiny): the teach phase may stay in-process
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, ["opd.pipelined=true", "model.dtype=bf16"])
    assert "opd.pipelined" in [p for p, _ in err.value.errors], err.value.errors
    _load(tmp_path, ["opd.pipelined=true", "model.dtype=bf16", "resources.stages.teach={num_cpus: 1}"])
