"""Gradient checkpointing (`trainer.gradient_checkpointing`) on the torch trainer: the peak
memory and the time of one SFT optimiser step with and without it.

    python -m bench.bench_grad_ckpt [--layers L] [--hidden H] [--tokens T] [--rows B]

A random Qwen2-shaped model (vocabulary 8192, untied head), one micro-batch of B rows of T
random tokens, fp32, 1 thread, the SFT loss (`experts.sft.SFTLoss`, 1024-token log-prob
chunks). Each measurement is one fresh process: a warm-up step, then a timed one; peak
memory = peak RSS after the timed step minus RSS before the warm-up (so it counts the
activations, gradients and optimiser state, not the weights).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from bench.common import emit_json, child_main, current_rss_bytes, peak_rss_bytes, qwen2_config, run_child, save_random_model

MODULE = "bench.bench_grad_ckpt"


def child(args: dict) -> dict:
    import torch

    from engine.batching import Sample, build_step_batches
    from engine.trainer import TrainerSettings, build_trainer
    from experts.sft import SFTLoss

    torch.set_num_threads(1)
    tr = build_trainer(TrainerSettings(lr=1e-4, gradient_checkpointing=args["ckpt"]), args["dir"])
    g = torch.Generator().manual_seed(0)
    T, B = args["tokens"], args["rows"]
    s = [Sample(torch.randint(2, 8192, (T,), generator=g).tolist(), [0] + [1] * (T - 1)) for _ in range(B)]
    (mb,) = build_step_batches(s, micro_batch_size=B, pad_id=0)
    mb["global_tokens"] = torch.tensor(float(B * (T - 1)))
    loss = SFTLoss(1024)
    rss0 = current_rss_bytes()
    tr.train_step([dict(mb)], loss)
    t0 = time.perf_counter()
    m = tr.train_step([dict(mb)], loss)
    return {"seconds": time.perf_counter() - t0, "peak_extra_mib": (peak_rss_bytes() - rss0) / 2 ** 20,
            "loss": m["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = save_random_model(qwen2_config(8192, args.hidden, args.layers, 4 * args.hidden), tmp + "/m", seed=0)
        out = {"layers": args.layers, "hidden": args.hidden, "tokens": args.tokens, "rows": args.rows,
               "params": model["params"]}
        for ckpt in (False, True):
            out["checkpointing" if ckpt else "plain"] = run_child(
                MODULE, {"dir": model["dir"], "ckpt": ckpt, "tokens": args.tokens, "rows": args.rows},
                inprocess=False, child_fn=child)
    p, c = out["plain"], out["checkpointing"]
    out["memory_saved_mib"] = p["peak_extra_mib"] - c["peak_extra_mib"]
    out["time_ratio"] = c["seconds"] / p["seconds"]
    emit_json(out, args.out)


if __name__ == "__main__":
    if not child_main(sys.argv[1:], child):
        main()
