"""Every benchmark runs at a tiny size (`--quick --inprocess`) and writes a sane result file.

The figures themselves are not asserted (they depend on the machine); what is asserted is
that each script runs end to end, that its JSON has the fields BENCHMARKS.md reads, and the
pure arithmetic the tables are built on (hand-worked values in comments).
"""

import json
import math

import pytest
import torch

from bench import bench_cache, bench_flops, bench_grpo_vs_trl, bench_kl_kernel, bench_opd_vs_trl, run_all
from bench.common import summarize


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _read(out, name):
    data = json.loads((out / f"{name}.json").read_text())
    assert data["benchmark"] == name and data["machine"]["cores"] >= 1
    return data


def test_summarize_median_min_max():
    # median of 3, 1, 2 is 2; of 4 values the mean of the middle two: (2 + 3) / 2 = 2.5
    assert summarize([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert summarize([4.0, 1.0, 3.0, 2.0])["median"] == 2.5
    with pytest.raises(ValueError, match="no measurements"):
        summarize([])


def test_bytes_per_token_by_hand():
    # Qwen3-8B: hidden 4096 x 2 B = 8192; vocab 151936 x 2 B = 303872; top-64: 64 x (2 + 4) = 384
    assert bench_cache.compute_bytes_per_token(4096, 151936, 2) == {
        "hidden_bytes": 8192, "full_logits_bytes": 303872, "topk_bytes": 384}


def test_step_flops_by_hand():
    # N=10 params, D=4 tokens: 6*10*4 = 240; attention 12 * L=2 * H=3 * T=5 * D=4 = 1440
    assert bench_flops.compute_step_flops(10, 4, 2, 3, 5) == {"dense": 240, "with_attention": 240 + 1440}


def test_naive_peak_estimate_grows_with_tokens_chunked_does_not():
    naive = [bench_kl_kernel.estimate_bytes(32768, 1024, n, "naive") for n in (2048, 8192)]
    chunked = [bench_kl_kernel.estimate_bytes(32768, 1024, n, "chunked") for n in (2048, 8192)]
    work = lambda est, n: est - 4 * (3 * n * 1024 + 3 * 32768 * 1024)  # noqa: E731 - minus inputs and grads
    assert work(naive[1], 8192) == 4 * work(naive[0], 2048)
    assert work(chunked[1], 8192) == work(chunked[0], 2048)


def test_run_all_commands():
    assert run_all.command("kl_kernel", True, "/x")[-3:] == ["--quick", "--out", "/x"]
    assert run_all.command("rewards", True, "/x")[-2:] == ["--n", "50"]
    assert set(run_all.BENCHES) == {"opd_vs_trl", "kl_kernel", "cache", "grpo_vs_trl", "flops", "rewards"}


def test_kl_kernel_quick(tmp_path):
    bench_kl_kernel.main(["--quick", "--inprocess", "--out", str(tmp_path)])
    r = _read(tmp_path, "kl_kernel")["results"][0]
    assert r["loss_rel_diff"] < 1e-5  # chunked and naive compute the same loss
    assert math.isclose(r["naive"]["grad_w_norm"], r["chunked"]["grad_w_norm"], rel_tol=1e-4)


def test_cache_quick(tmp_path):
    bench_cache.main(["--quick", "--out", str(tmp_path)])
    r = _read(tmp_path, "cache")
    assert 256 * 2 <= r["measured_cache"]["bytes_per_token"] < 256 * 2 * 1.05  # bf16 hidden 256 + headers
    assert {x["state"] for x in r["reads"]} == {"warm", "cold"}
    assert all(x["mib_per_s"]["median"] > 0 for x in r["reads"])


def test_flops_quick(tmp_path):
    bench_flops.main(["--quick", "--out", str(tmp_path)])
    r = _read(tmp_path, "flops")
    assert 0 < r["fraction_of_matmul"] < 5 and r["step_seconds"]["median"] > 0


def test_opd_vs_trl_quick(tmp_path):
    bench_opd_vs_trl.main(["--quick", "--inprocess", "--out", str(tmp_path)])
    r = _read(tmp_path, "opd_vs_trl")
    assert [c["teacher"] for c in r["comparisons"]] == ["t1x", "t4x_0"]
    assert all(c["ratio_tokens_per_s"] > 0 and math.isfinite(c["ours"]["loss"][0]) for c in r["comparisons"])
    for c in r["comparisons"]:  # padded and packed train the same first step
        assert math.isclose(c["ours_packed"]["loss"][0], c["ours"]["loss"][0], rel_tol=1e-5)
        assert c["ours_packed"]["ratio_tokens_per_s_with_prefill"] > 0
    sweep = r["teacher_sweep"]
    assert [s["teachers"] for s in sweep] == [1, 2]
    assert [max(s["head_loads_per_step"]) for s in sweep] == [1, 2] and all(s["max_resident_heads"] == 1 for s in sweep)


def test_grpo_vs_trl_quick(tmp_path):
    bench_grpo_vs_trl.main(["--quick", "--inprocess", "--out", str(tmp_path)])
    r = _read(tmp_path, "grpo_vs_trl")
    for side in ("ours (padded)", "ours (packed)", "trl"):
        assert 0 < r[side]["excl_generation_seconds"]["median"] <= r[side]["step_seconds"]["median"]
        assert r[side]["train_tokens_per_s"] >= r[side]["step_tokens_per_s"] > 0
    assert r["completion_lengths"]["trl"]["max"] <= r["config"]["max_new_tokens"]
