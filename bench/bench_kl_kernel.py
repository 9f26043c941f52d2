"""Chunked vs naive full-vocabulary reverse KL, forward + backward: time and peak memory.

    python -m bench.bench_kl_kernel [--quick] [--full] [--repeats N]

Both compute `sum_i KL(p_s(.|i) || p_t(.|i))` over N tokens with the gradient with respect
to the student's hidden states (N, H) and vocabulary projection (V, H); the teacher's logits
come from its cached pre-norm states through RMSNorm + projection (`compute_rmsnorm_logits`),
fp32, 1 thread.
- naive: plain autograd over the full (N, V) logits: `log_softmax`, `exp`, product, sum.
- chunked: `distill.kl.compute_chunked_divergence` (1024-token chunks, logits recomputed in
  backward, closed-form gradient), which never holds more than a chunk's (c, V) buffers.
Each measurement runs in a fresh process: peak memory = peak RSS minus RSS once the inputs
exist (so it counts the work buffers and the gradients, not the inputs).

Grid: V in {32k, 128k} x H in {1024, 2048, 4096} x N in {2k, 4k, 8k}. A size whose
estimated naive peak does not fit the memory budget (24 GiB machine, minus what is in use)
is skipped and recorded. The full grid takes hours on one core, so the default run
measures V=32k, H=1024, N=8192 (the target's vocabulary, N eight chunks long; 2 passes per
process) and records the rest as "not run (time)"; `--full` runs every size that fits.
"""

from __future__ import annotations

import argparse
import sys
import time

from bench.common import (MIB, child_main, current_rss_bytes, fmt, num, peak_rss_bytes, print_table, run_child,
                          set_threads, summarize, write_results)

MODULE = "bench.bench_kl_kernel"
VOCABS, HIDDENS, TOKENS = (32768, 131072), (1024, 2048, 4096), (2048, 4096, 8192)
DEFAULT_POINTS = [(32768, 1024, 8192)]  # the target size: 32k vocabulary, N >> chunk
QUICK_POINTS = [(2048, 64, 512)]
NAIVE_NV_BUFFERS = 6  # (N, V) fp32 tensors alive at the naive peak: z_s, log p_s, p_s, log p_t, diff, product
GIB = 1024 ** 3


def estimate_bytes(v: int, h: int, n: int, method: str, chunk: int = 1024) -> int:
    """Inputs + gradients + the method's (rows, V) work buffers, fp32."""
    inputs = 4 * (2 * n * h + 2 * v * h)
    grads = 4 * (n * h + v * h)
    rows = n if method == "naive" else min(n, chunk)
    return inputs + grads + NAIVE_NV_BUFFERS * 4 * rows * v


def _inputs(v: int, h: int, n: int):
    import torch

    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(n, h, generator=g).requires_grad_(True)  # (N, H)
    w_s = (torch.randn(v, h, generator=g) / h ** 0.5).requires_grad_(True)  # (V, H)
    h_t = torch.randn(n, h, generator=g)  # (N, H) teacher pre-norm states
    w_t = torch.randn(v, h, generator=g) / h ** 0.5  # (V, H)
    norm = 1.0 + 0.1 * torch.randn(h, generator=g)  # (H,)
    return h_s, w_s, h_t, (norm, 1e-6, w_t)


def naive_reverse_kl(h_s, w_s, h_t, head):
    """Full-logits reverse KL summed over tokens, autograd does the rest."""
    import torch

    from distill.kl import compute_rmsnorm_logits

    log_ps = torch.log_softmax(h_s @ w_s.T, dim=-1)  # (N, V)
    with torch.no_grad():
        log_pt = torch.log_softmax(compute_rmsnorm_logits(h_t, head[0], head[1], head[2]), dim=-1)  # (N, V)
    return (log_ps.exp() * (log_ps - log_pt)).sum()


def chunked_reverse_kl(h_s, w_s, h_t, head):
    import torch

    from distill.kl import compute_chunked_divergence

    w = torch.ones(h_s.shape[0])
    return compute_chunked_divergence(h_s, w_s, h_t, head, w, kind="reverse_kl", chunk_size=1024)[0]


def kernel_child(a: dict) -> dict:
    set_threads(a["threads"])
    fn = {"naive": naive_reverse_kl, "chunked": chunked_reverse_kl}[a["method"]]
    h_s, w_s, h_t, head = _inputs(a["vocab"], a["hidden"], a["tokens"])
    base = current_rss_bytes()
    seconds, loss = [], None
    for _ in range(a["repeats"]):
        h_s.grad = w_s.grad = None
        t0 = time.perf_counter()
        loss = fn(h_s, w_s, h_t, head)
        loss.backward()
        seconds.append(time.perf_counter() - t0)
    return {"seconds": seconds, "peak_extra_bytes": peak_rss_bytes() - base, "loss": float(loss),
            "grad_h_norm": float(h_s.grad.norm()), "grad_w_norm": float(w_s.grad.norm())}


def memory_budget() -> int:
    import psutil

    return min(24 * GIB, psutil.virtual_memory().available) - 2 * GIB


def measure_point(v, h, n, opts) -> dict:
    res = {"vocab": v, "hidden": h, "tokens": n}
    for method in ("naive", "chunked"):
        r = run_child(MODULE, {"method": method, "vocab": v, "hidden": h, "tokens": n, "repeats": opts.repeats,
                               "threads": opts.threads}, inprocess=opts.inprocess, child_fn=kernel_child)
        res[method] = {"seconds": summarize(r["seconds"]), "peak_extra_mib": r["peak_extra_bytes"] / MIB,
                       "loss": r["loss"], "grad_h_norm": r["grad_h_norm"], "grad_w_norm": r["grad_w_norm"]}
    res["time_ratio_chunked_over_naive"] = res["chunked"]["seconds"]["median"] / res["naive"]["seconds"]["median"]
    res["memory_ratio_naive_over_chunked"] = (res["naive"]["peak_extra_mib"]
                                              / max(res["chunked"]["peak_extra_mib"], 1e-9))
    res["loss_rel_diff"] = abs(res["naive"]["loss"] - res["chunked"]["loss"]) / max(abs(res["naive"]["loss"]), 1e-12)
    return res


def plan_grid(opts) -> tuple[list[tuple], list[dict]]:
    """Points to measure, and the skipped ones with the reason."""
    if opts.quick:
        return QUICK_POINTS, []
    budget = memory_budget()
    run, skipped = [], []
    for v in VOCABS:
        for h in HIDDENS:
            for n in TOKENS:
                est = estimate_bytes(v, h, n, "naive")
                if est > budget:
                    skipped.append({"vocab": v, "hidden": h, "tokens": n, "reason": "memory",
                                    "naive_estimate_gib": round(est / GIB, 1), "budget_gib": round(budget / GIB, 1)})
                elif opts.full or (v, h, n) in DEFAULT_POINTS:
                    run.append((v, h, n))
                else:
                    skipped.append({"vocab": v, "hidden": h, "tokens": n, "reason": "time (run with --full)",
                                    "naive_estimate_gib": round(est / GIB, 1)})
    return run, skipped


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if child_main(argv, kernel_child):
        return {}
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--full", action="store_true", help="every grid size that fits in memory (hours)")
    p.add_argument("--repeats", type=int, default=None, help="timed forward+backward passes per process")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--inprocess", action="store_true", help="no subprocesses (peak memory then meaningless)")
    p.add_argument("--out", default=None)
    opts = p.parse_args(argv)
    opts.repeats = opts.repeats or 2
    points, skipped = plan_grid(opts)
    results = [measure_point(v, h, n, opts) for v, h, n in points]
    target = next((r for r in results if r["vocab"] == 32768), None)
    res = {"quick": opts.quick, "threads": opts.threads, "repeats": opts.repeats, "chunk_size": 1024,
           "results": results, "skipped": skipped,
           "targets": {"memory_ratio_at_32k": {"target": 4.0, "measured": target and
                                               target["memory_ratio_naive_over_chunked"]},
                       "time_ratio_at_32k": {"target": 1.3, "measured": target and
                                             target["time_ratio_chunked_over_naive"]}}}
    write_results("kl_kernel", res, opts.out)
    rows = [[r["vocab"], r["hidden"], r["tokens"], fmt(r["naive"]["seconds"]), fmt(r["chunked"]["seconds"]),
             f"{r['time_ratio_chunked_over_naive']:.2f}x", num(r["naive"]["peak_extra_mib"]),
             num(r["chunked"]["peak_extra_mib"]), f"{r['memory_ratio_naive_over_chunked']:.1f}x",
             f"{r['loss_rel_diff']:.1e}"] for r in results]
    print_table("Reverse KL forward+backward, chunked vs naive (seconds median [min-max]; peak MiB above inputs)",
                ["V", "H", "N", "naive s", "chunked s", "time c/n", "naive MiB", "chunked MiB", "mem n/c",
                 "loss rel diff"], rows)
    if skipped:
        print(f"  skipped: {sum(s['reason'] == 'memory' for s in skipped)} sizes for memory, "
              f"{sum(s['reason'] != 'memory' for s in skipped)} for time (see the JSON)")
    return res


if __name__ == "__main__":
    main()
