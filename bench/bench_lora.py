"""LoRA (`trainer.lora`) and gradient checkpointing (`trainer.gradient_checkpointing`) against
full fine-tuning on the torch trainer: peak memory (RSS) and the time of one SFT step.

    python -m bench.bench_lora [--model small-hf|wide] [--tokens T] [--rows B] [--steps N]

`small-hf`: the model of configs/small-hf.yaml (its `model.toy_hf` spec: a toy Qwen3, hidden
64, 2 layers, vocabulary 512), one micro-batch of B x T random tokens (default 2 x 256: that
config's SFT micro-batch and max_length). `wide`: a random Qwen2-shaped model of 25M
parameters (hidden 512, 6 layers, vocabulary 8192), where the weights, not the Python
runtime, dominate memory. LoRA: r 8, alpha 16, the seven projections (the `trainer.lora`
defaults). fp32, AdamW, 1 thread. Each arm is a fresh process: RSS after the imports (torch,
transformers and peft in every arm), then
the trainer is built, a warm-up step, and N timed steps (median). Reported: the process's
peak RSS, and the peak over the RSS after the imports (weights, gradients, optimiser state,
activations).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

from bench.common import (emit_json, child_main, current_rss_bytes, machine_info, peak_rss_bytes, qwen2_config, run_child,
                          save_random_model)

MODULE = "bench.bench_lora"
ARMS = {"full": (False, False), "lora": (True, False), "checkpointing": (False, True),
        "lora+checkpointing": (True, True)}


def child(args: dict) -> dict:
    import torch

    from engine.batching import Sample, build_step_batches
    from engine.trainer import TrainerSettings, build_trainer
    from experts.sft import SFTLoss

    import peft  # noqa: F401  (imported by every arm, so the RSS baseline counts no library)
    import transformers  # noqa: F401

    torch.set_num_threads(1)
    rss0 = current_rss_bytes()
    settings = TrainerSettings(lr=1e-4, gradient_checkpointing=args["ckpt"], lora={} if args["lora"] else None)
    tr = build_trainer(settings, args["dir"])
    trainable = sum(p.numel() for p in tr.lm.parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(0)
    T, B, V = args["tokens"], args["rows"], args["vocab"]
    s = [Sample(torch.randint(2, V, (T,), generator=g).tolist(), [0] + [1] * (T - 1)) for _ in range(B)]
    (mb,) = build_step_batches(s, micro_batch_size=B, pad_id=0)
    mb["global_tokens"] = torch.tensor(float(B * (T - 1)))
    loss = SFTLoss(1024)
    tr.train_step([dict(mb)], loss)
    times, losses = [], []
    for _ in range(args["steps"]):
        t0 = time.perf_counter()
        losses.append(tr.train_step([dict(mb)], loss)["loss"])
        times.append(time.perf_counter() - t0)
    return {"step_seconds": statistics.median(times), "step_seconds_all": times,
            "peak_rss_mib": peak_rss_bytes() / 2 ** 20, "peak_extra_mib": (peak_rss_bytes() - rss0) / 2 ** 20,
            "trainable_params": trainable, "losses": losses}


def _model(name: str, root: str) -> tuple[str, int, int]:
    """(model dir, parameters, vocabulary)."""
    if name == "wide":
        m = save_random_model(qwen2_config(8192, 512, 6, 2048), root + "/m", seed=0)
        return m["dir"], m["params"], 8192
    from engine.toy_hf import ToyHFSpec, materialize_toy_hf
    from pipeline.config import load_config

    spec = ToyHFSpec(**load_config("configs/small-hf.yaml", check_files=False).model.toy_hf.model_dump())
    path = materialize_toy_hf(spec, root + "/m", seed=0)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(path))
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    return str(path), params, spec.vocab_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("small-hf", "wide"), default="small-hf")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path, params, vocab = _model(args.model, tmp)
        out = {"model": args.model, "params": params, "tokens": args.tokens, "rows": args.rows,
               "timed_steps": args.steps, "machine": machine_info()}
        for arm, (lora, ckpt) in ARMS.items():
            out[arm] = run_child(MODULE, {"dir": path, "lora": lora, "ckpt": ckpt, "tokens": args.tokens,
                                          "rows": args.rows, "vocab": vocab, "steps": args.steps},
                                 inprocess=False, child_fn=child)
    full = out["full"]
    for arm in ARMS:
        out[arm]["time_vs_full"] = out[arm]["step_seconds"] / full["step_seconds"]
        out[arm]["peak_extra_vs_full"] = out[arm]["peak_extra_mib"] / full["peak_extra_mib"]
    emit_json(out, args.out)


if __name__ == "__main__":
    if not child_main(sys.argv[1:], child):
        main()
