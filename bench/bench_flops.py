"""Achieved FLOP/s of the student's training step against this machine's fp32 matmul rate.

    python -m bench.bench_flops [--quick] [--repeats N] [--threads N]

The step: one optimiser step of the torch trainer (`engine.trainer`, AdamW, clip 1.0) on a
random Qwen2-shaped model of ~32M parameters (hidden 512, 8 layers, MLP 1408, vocabulary
8192, untied head) with a token-mean cross-entropy loss, batch 4 x 256 tokens, fp32.
FLOPs per step = 6 * N * D, N = parameters that do matmuls (all but the input embedding,
which is a lookup), D = tokens in the step (forward 2ND, backward 4ND); the attention
score/value matmuls add 12 * layers * hidden * T per token and are reported as a second
figure. The limit: a 2048^3 `torch.matmul` (2 * 2048^3 FLOPs) timed in the same process
with the same thread count, median of several runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench.common import fmt, num, print_table, qwen2_config, save_random_model, set_threads, summarize, write_results

FULL = {"vocab": 8192, "hidden": 512, "layers": 8, "intermediate": 1408, "batch": 4, "seq": 256, "matmul": 2048}
QUICK = {"vocab": 512, "hidden": 64, "layers": 2, "intermediate": 128, "batch": 2, "seq": 32, "matmul": 256}


def compute_step_flops(matmul_params: int, tokens: int, layers: int, hidden: int, seq: int) -> dict:
    """6 N D, and 6 N D + 12 L H T D (attention scores and values, causal mask not discounted)."""
    dense = 6 * matmul_params * tokens
    return {"dense": dense, "with_attention": dense + 12 * layers * hidden * seq * tokens}


def matmul_rates(n: int, repeats: int) -> list[float]:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        rates.append(2 * n ** 3 / (time.perf_counter() - t0))
    return rates


class CrossEntropyLoss:
    """Token-mean next-token cross-entropy over the batch's loss mask."""

    def __call__(self, hidden, weight, batch):
        import torch

        logits = hidden[:, :-1] @ weight.T  # (B, T-1, V)
        targets = batch["input_ids"][:, 1:]  # (B, T-1)
        mask = batch["loss_mask"][:, 1:].float()  # (B, T-1)
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        return (nll * mask.flatten()).sum() / mask.sum(), {}


def step_seconds(model_dir: str, cfg: dict, repeats: int) -> list[float]:
    import torch

    from engine.trainer import TrainerSettings, build_trainer

    trainer = build_trainer(TrainerSettings(lr=1e-4, seed=0, deterministic=False), model_dir)
    g = torch.Generator().manual_seed(0)
    b, t = cfg["batch"], cfg["seq"]
    batch = {"input_ids": torch.randint(2, cfg["vocab"], (b, t), generator=g),
             "attention_mask": torch.ones(b, t, dtype=torch.long),
             "position_ids": torch.arange(t).expand(b, t).contiguous(), "loss_mask": torch.ones(b, t, dtype=torch.long)}
    loss = CrossEntropyLoss()
    trainer.train_step([batch], loss)  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        trainer.train_step([batch], loss)
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--inprocess", action="store_true", help="accepted for symmetry; this benchmark has no children")
    opts = p.parse_args(argv)
    set_threads(opts.threads)
    cfg = QUICK if opts.quick else FULL
    repeats = opts.repeats or (2 if opts.quick else 5)
    with tempfile.TemporaryDirectory(prefix="bench-flops-") as tmp:
        model = save_random_model(qwen2_config(cfg["vocab"], cfg["hidden"], cfg["layers"], cfg["intermediate"]),
                                  Path(tmp) / "model", seed=0)
        before = matmul_rates(cfg["matmul"], repeats)
        steps = step_seconds(model["dir"], cfg, repeats)
        after = matmul_rates(cfg["matmul"], repeats)
    matmul_params = model["params"] - cfg["vocab"] * cfg["hidden"]  # minus the input embedding (a lookup)
    tokens = cfg["batch"] * cfg["seq"]
    flops = compute_step_flops(matmul_params, tokens, cfg["layers"], cfg["hidden"], cfg["seq"])
    limit = summarize(before + after)
    achieved = summarize([flops["dense"] / s for s in steps])
    res = {"quick": opts.quick, "config": cfg, "threads": opts.threads, "params": model["params"],
           "matmul_params": matmul_params, "tokens_per_step": tokens, "flops_per_step": flops,
           "step_seconds": summarize(steps), "achieved_flops": achieved,
           "achieved_flops_with_attention": summarize([flops["with_attention"] / s for s in steps]),
           "matmul_flops": limit, "fraction_of_matmul": achieved["median"] / limit["median"],
           "fraction_of_matmul_with_attention": flops["with_attention"] / flops["dense"] * achieved["median"]
           / limit["median"], "formula": "6 * N_matmul_params * tokens (+ 12 * layers * hidden * seq * tokens)"}
    write_results("flops", res, opts.out)
    g = 1e9
    print_table(f"Training step FLOP/s vs fp32 matmul ({model['params'] / 1e6:.1f}M params, {tokens} tokens/step, "
                f"{opts.threads} thread(s); GFLOP/s median [min-max])",
                ["step s", "achieved 6ND", "achieved +attn", f"matmul {cfg['matmul']}^3", "fraction", "fraction +attn"],
                [[fmt(res["step_seconds"]), fmt({k: v / g for k, v in achieved.items() if k != "n"}),
                  fmt({k: v / g for k, v in res["achieved_flops_with_attention"].items() if k != "n"}),
                  fmt({k: v / g for k, v in limit.items() if k != "n"}), f"{res['fraction_of_matmul']:.2f}",
                  num(res["fraction_of_matmul_with_attention"])]])
    return res


if __name__ == "__main__":
    main()
