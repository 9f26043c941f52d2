"""The HF generator's two decode paths on the demo's rollout shapes: transformers `generate`
(every row computed until the batch's longest stops) against `HFGenerator`'s compacting loop
(finished rows leave the batch), tokens/s and wall time, and whether the two give the same
tokens and log-probs bit for bit.

    python -m bench.bench_generation --model RUN/sft-all/final --data RUN/prepare/data \\
        [--domains math tool] [--prompts 128] [--samples 8] [--max-new 48 96] [--repeats 3] \\
        [--variants 0.25/16] [--out FILE]

The prompts are the first `--prompts` training prompts, taken round-robin over the domains
under `--data` (`<domain>/train.jsonl`, rendered with the model's chat template as the
rollouts render them); temperature 1, the generator's batch size 128 (configs/tiny.yaml).
Each repeat runs every variant once, alternating, on one thread; wall and process CPU
seconds are both reported (CPU time is the steadier number on a shared machine). "tokens"
counts generated tokens (each completion's length, stop token included). A variant
`1/16` is the loop without compaction (it isolates the loop's own overhead from the rows it
drops).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench.common import emit_json


def load_prompts(data_dir: Path, tokenizer, count: int, only: list[str] | None = None) -> list[list[int]]:
    from engine import chat

    domains = sorted(p for p in data_dir.iterdir() if (p / "train.jsonl").is_file() and (not only or p.name in only))
    if not domains:
        raise FileNotFoundError(f"bench_generation: no <domain>/train.jsonl under {data_dir}")
    rows = {d.name: [json.loads(line) for line in (d / "train.jsonl").open()][:count] for d in domains}
    out = []
    for k in range(count):
        row = rows[domains[k % len(domains)].name][k // len(domains)]
        out.append(chat.render_prompt(row["messages"][:1], tokenizer, **chat.row_template_kwargs(row)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="an HF model dir with its tokenizer")
    ap.add_argument("--data", required=True, help="a prepare stage's data dir (<domain>/train.jsonl)")
    ap.add_argument("--domains", nargs="+", default=None, help="only these domains' prompts (default: all)")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new", type=int, nargs="+", default=[48, 96])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=["0.25/16"],
                    help="compacting loops to time, each compact_fraction/compact_min_rows")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from engine.generation import HFGenerator, SamplingParams
    from engine.model import load_model, load_tokenizer

    tok = load_tokenizer(args.model)
    model = load_model(args.model)
    prompts = load_prompts(Path(args.data), tok, args.prompts, args.domains)
    variants = {"generate": HFGenerator(model, tok, batch_size=args.batch_size, compact=False)}
    for v in args.variants:
        f, m = v.split("/")
        variants[f"compact_{v}"] = HFGenerator(model, tok, batch_size=args.batch_size, compact_fraction=float(f),
                                               compact_min_rows=int(m))
    assert all(v.compact for k, v in variants.items() if k != "generate")
    result = {"model": args.model, "domains": args.domains or "all", "prompts": len(prompts), "samples": args.samples,
              "prompt_tokens_mean": statistics.mean(map(len, prompts)), "batch_size": args.batch_size,
              "threads": torch.get_num_threads(), "shapes": {}}
    for max_new in args.max_new:
        sampling = SamplingParams(n=args.samples, temperature=1.0, max_new_tokens=max_new, seed=1234)
        times: dict[str, list[float]] = {k: [] for k in variants}
        cpu: dict[str, list[float]] = {k: [] for k in variants}
        outs = {}
        for _ in range(args.repeats):
            for name, gen in variants.items():
                t0, c0 = time.perf_counter(), time.process_time()
                outs[name] = gen.generate(prompts, sampling)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        ref = outs["generate"]
        lengths = [len(c.token_ids) for c in ref]
        shape = {"completion_tokens": sum(lengths), "length_mean": statistics.mean(lengths),
                 "length_max": max(lengths), "stopped": sum(c.finish_reason == "stop" for c in ref)}
        for name, ts in times.items():
            got = outs[name]
            entry = {"wall_s": ts, "wall_s_median": statistics.median(ts), "cpu_s": cpu[name],
                     "cpu_s_median": statistics.median(cpu[name]),
                     "tokens_per_s": sum(len(c.token_ids) for c in got) / statistics.median(ts)}
            if name != "generate":
                same_tokens = [a.token_ids == b.token_ids for a, b in zip(got, ref)]
                diffs = [max((abs(x - y) for x, y in zip(a.logprobs, b.logprobs)), default=0.0)
                         for a, b in zip(got, ref) if a.token_ids == b.token_ids]
                entry.update({
                    "rows_with_different_tokens": same_tokens.count(False),
                    "finish_reasons_equal": all(a.finish_reason == b.finish_reason for a, b in zip(got, ref)),
                    "logprobs_bitwise_equal_rows": sum(a.logprobs == b.logprobs for a, b in zip(got, ref)),
                    "logprob_max_abs_diff": max(diffs, default=0.0),
                    "speedup_vs_generate": statistics.median(times["generate"]) / statistics.median(ts),
                    "cpu_speedup_vs_generate": statistics.median(cpu["generate"]) / statistics.median(cpu[name]),
                })
            shape[name] = entry
        result["shapes"][str(max_new)] = shape
    emit_json(result, args.out)


if __name__ == "__main__":
    main()
