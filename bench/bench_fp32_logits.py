"""The student's vocabulary projection in float32 vs bf16 in the chunked KL kernel
(`distill.kl.compute_chunked_divergence(..., fp32_logits=...)`): per-token KL error
against a float64 reference on the same bf16 inputs, and the forward + backward time.

    python -m bench.bench_fp32_logits [--tokens N] [--hidden H] [--vocab V] [--repeats R]

bf16 student hidden states and projection whose logits reach ~26 (a trained LM's range);
the teacher's logits are the student's exact ones plus N(0, 0.3) noise (a teacher close to
the student, KL ~0.05 a token, as late in distillation), fed through an identity head, so
the error measured is the student side's. One thread, chunks of 256 tokens. Memory: the
float32 projection adds one float32 copy of the weight (V x H x 4 bytes) while the kernel
runs, independent of the token count; the chunk's (c, V) buffers are float32 either way.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import emit_json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from distill.kl import compute_chunked_divergence

    g = torch.Generator().manual_seed(0)
    n, h, v = args.tokens, args.hidden, args.vocab
    hid = torch.randn(n, h, generator=g).to(torch.bfloat16)
    w = (torch.randn(v, h, generator=g) * (4.0 / h ** 0.5)).to(torch.bfloat16)  # logit std ~4, max ~20-30
    z = hid.double() @ w.double().T  # (n, v)
    z_t = z + 0.3 * torch.randn(n, v, generator=g, dtype=torch.float64)
    log_ps, log_pt = torch.log_softmax(z, -1), torch.log_softmax(z_t, -1)
    ref = (log_ps.exp() * (log_ps - log_pt)).sum(-1)  # reverse KL per token, float64
    del z, log_ps, log_pt
    teacher = z_t.float()
    del z_t
    out = {"tokens": n, "hidden": h, "vocab": v, "max_abs_logit": float((hid.float() @ w.float().T).abs().max()),
           "kl_mean": float(ref.mean())}
    for fp32 in (True, False):
        times = []
        for _ in range(args.repeats):
            hh, ww = hid.clone().requires_grad_(), w.clone().requires_grad_()
            t0 = time.perf_counter()
            loss, per = compute_chunked_divergence(hh, ww, teacher, lambda x: x, torch.ones(n), chunk_size=256,
                                                   fp32_logits=fp32)
            loss.backward()
            times.append(time.perf_counter() - t0)
        rel = ((per.double() - ref).abs() / ref)
        key = "fp32_projection" if fp32 else "bf16_projection"
        out[key] = {"kl_rel_err_median": float(rel.median()), "kl_rel_err_max": float(rel.max()),
                    "seconds_median": statistics.median(times), "seconds": times,
                    "extra_weight_copy_mib": (v * h * 4 / 2 ** 20) if fp32 else 0.0}
    out["time_ratio_fp32_over_bf16"] = out["fp32_projection"]["seconds_median"] / out["bf16_projection"]["seconds_median"]
    emit_json(out, args.out)


if __name__ == "__main__":
    main()
