"""Our OPD training step vs `trl.DistillationTrainer`, and our memory as teachers multiply.

    python -m bench.bench_opd_vs_trl [--quick] [--repeats N] [--steps N]

What is compared (CPU, 1 thread, fp32, same student, same teacher, same 8 sequences of
a 32-token prompt and a response of 128, 112, 80, 48, 24, 12, 8 or 6 random token ids
(the spread of a round's rollouts: short answers beside budget-long ones; 38% of a
right-padded batch is real tokens), batch 8 in one micro-batch, AdamW, clip 1.0):
- ours: one optimiser step of `distill.opd.train_round`: student forward, the teacher's
  cached PRE-norm hidden states read from the cache, its extracted head (final norm +
  projection) under the `HeadManager`, chunked reverse KL (distill.kl), backward, step.
  The teacher's prefill ran before, in the teach phase; it is reported separately and also
  amortised into an "end to end" figure (each sample is trained once per round).
  Twice: right-padded (prefill and training), and padding-free (`prefill_tokens`,
  `micro_batch_tokens`: the sequences packed into rows as long as the longest).
- TRL: one optimiser step of `DistillationTrainer` (trl 1.16), teacher resident: student
  forward, teacher forward, TRL's own chunked full-vocabulary divergence (beta=1.0 =
  reverse KL), backward, step. Generation is excluded: `_generate` returns the same
  pre-generated sequences. Gradient checkpointing is off (TRL's default is on; ours has none).
Each configuration runs in fresh processes (`--repeats`), each taking `--steps` timed steps
after one warm-up step; tokens/s counts the sequences' real tokens (prompt + response),
the same count for every side.

Shapes: vocabulary 8192 so the head is a realistic share of a model (~15% of the 4x
teacher, as a 152k head is of an 8B model); student hidden 256 x 4 layers; the 1x teacher
has the student's shape (other seed); the 4x teacher is hidden 512 x 8 layers.
Multi-teacher: 1, 2, 4, 8 teachers of the 4x shape, samples routed round robin; our peak
RSS and step time, beside what TRL's approach (every teacher resident) needs for the
teachers' weights alone: N x parameter bytes.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

from bench.common import (MIB, child_main, fmt, print_table, qwen2_config, run_child, save_random_model,
                          summarize, write_results)
from bench.opd_children import run_named_child

MODULE = "bench.bench_opd_vs_trl"
FULL = {"vocab": 8192, "student": (256, 4, 704), "t1x": (256, 4, 704), "t4x": (512, 8, 1408),
        "batch": 8, "prompt_len": 32, "response_lens": [128, 112, 80, 48, 24, 12, 8, 6], "teachers": [1, 2, 4, 8],
        "chunk_size": 1024}
QUICK = {"vocab": 512, "student": (64, 2, 128), "t1x": (64, 2, 128), "t4x": (128, 4, 256),
         "batch": 4, "prompt_len": 8, "response_lens": [8, 5, 3, 2], "teachers": [1, 2], "chunk_size": 16}


def _child(args: dict, inprocess: bool) -> dict:
    return run_child(MODULE, args, inprocess=inprocess, child_fn=run_named_child)


def build_models(cfg: dict, root: Path) -> dict:
    """Student, the 1x teacher and max(teachers) teachers of the 4x shape (t4x_0 is 'the' 4x)."""
    v = cfg["vocab"]
    models = {"student": save_random_model(qwen2_config(v, *cfg["student"]), root / "student", seed=0),
              "t1x": save_random_model(qwen2_config(v, *cfg["t1x"]), root / "t1x", seed=1)}
    for i in range(max(cfg["teachers"])):
        models[f"t4x_{i}"] = save_random_model(qwen2_config(v, *cfg["t4x"]), root / f"t4x_{i}", seed=10 + i)
    return models


def write_sequences(cfg: dict, path: Path) -> None:
    import json

    rng = random.Random(0)
    lens = [cfg["prompt_len"] + r for r in cfg["response_lens"]]
    if len(lens) != cfg["batch"]:
        raise ValueError(f"response_lens has {len(lens)} entries for batch {cfg['batch']}")
    seqs = [[rng.randrange(2, cfg["vocab"]) for _ in range(n)] for n in lens]
    path.write_text(json.dumps({"prompt_len": cfg["prompt_len"], "seqs": seqs}))


def _teach(cfg, root, seqs, teachers: list[str], tag: str, threads: int, inprocess: bool,
           packed: bool = False) -> dict:
    cache = root / f"cache-{tag}{'-packed' if packed else ''}" / "cache"
    res = _child({"kind": "teach", "threads": threads, "seqs": str(seqs), "teachers": teachers,
                  "cache_dir": str(cache), "packed": packed}, inprocess)
    res["heads"] = [str(cache.parent / f"head{t}.safetensors") for t in range(len(teachers))]
    res["cache_dir"] = str(cache)
    return res


def _repeat(args: dict, repeats: int, inprocess: bool) -> dict:
    runs = [_child(args, inprocess) for _ in range(repeats)]
    return {"step_seconds": [s for r in runs for s in r["step_seconds"]],
            "step_cpu_seconds": [s for r in runs for s in r["step_cpu_seconds"]],
            "peak_rss": [r["peak_rss"] for r in runs], "base_rss": [r["base_rss"] for r in runs], "runs": runs}


def compare_one(cfg, root, models, seqs, teacher: str, opts) -> dict:
    """Ours (padded, packed) vs TRL for one teacher: step times, tokens/s, peak RSS, prefill."""
    common = {"threads": opts.threads, "seqs": str(seqs), "warmup": 1, "steps": opts.steps,
              "student": models["student"]["dir"]}
    tokens = sum(cfg["prompt_len"] + r for r in cfg["response_lens"])  # real tokens per step
    out = {"teacher": teacher, "teacher_params": models[teacher]["params"], "tokens_per_step": tokens,
           "padded_cells_per_step": cfg["batch"] * (cfg["prompt_len"] + max(cfg["response_lens"]))}
    runs, raw = {}, None
    for name, packed in (("ours", False), ("ours_packed", True)):
        teach = _teach(cfg, root, seqs, [models[teacher]["dir"]], teacher, opts.threads, opts.inprocess, packed)
        r = _repeat({**common, "kind": "ours", "heads": teach["heads"], "cache_dir": teach["cache_dir"],
                     "micro_batch": cfg["batch"], "chunk_size": cfg["chunk_size"], "packed": packed},
                    opts.repeats, opts.inprocess)
        runs[name] = (teach, r)
        raw = raw or (teach, r)
    trl = _repeat({**common, "kind": "trl", "teacher": models[teacher]["dir"], "work_dir": str(root / "trl-out")},
                  opts.repeats, opts.inprocess)
    out["trl"] = {"step_seconds": summarize(trl["step_seconds"]), "step_cpu_seconds": summarize(trl["step_cpu_seconds"]),
                  "tokens_per_s": summarize([tokens / s for s in trl["step_seconds"]]),
                  "peak_rss_mib": summarize([x / MIB for x in trl["peak_rss"]]),
                  "base_rss_mib": summarize([x / MIB for x in trl["base_rss"]])}
    for name, (teach, r) in runs.items():
        prefill = sum(teach["prefill_seconds"])  # the whole batch, trained once per round
        o = {"step_seconds": summarize(r["step_seconds"]), "step_cpu_seconds": summarize(r["step_cpu_seconds"]),
             "tokens_per_s": summarize([tokens / s for s in r["step_seconds"]]),
             "tokens_per_s_with_prefill": summarize([tokens / (s + prefill) for s in r["step_seconds"]]),
             "prefill_seconds": prefill, "teach_peak_rss_mib": teach["peak_rss"] / MIB,
             "peak_rss_mib": summarize([x / MIB for x in r["peak_rss"]]),
             "base_rss_mib": summarize([x / MIB for x in r["base_rss"]]), "loss": r["runs"][0]["loss"]}
        o["ratio_tokens_per_s"] = o["tokens_per_s"]["median"] / out["trl"]["tokens_per_s"]["median"]
        o["ratio_tokens_per_s_with_prefill"] = (o["tokens_per_s_with_prefill"]["median"]
                                                / out["trl"]["tokens_per_s"]["median"])
        o["ratio_tokens_per_cpu_s"] = out["trl"]["step_cpu_seconds"]["median"] / o["step_cpu_seconds"]["median"]
        o["ratio_peak_rss"] = o["peak_rss_mib"]["median"] / out["trl"]["peak_rss_mib"]["median"]
        out[name] = o
    # kept at the top level for the padded run, as before
    for k in ("ratio_tokens_per_s", "ratio_tokens_per_s_with_prefill", "ratio_tokens_per_cpu_s", "ratio_peak_rss"):
        out[k] = out["ours"][k]
    out["prefill_seconds"] = out["ours"]["prefill_seconds"]
    out["_raw"] = raw
    return out


def teacher_sweep(cfg, root, models, seqs, opts, one_teacher: tuple[dict, dict]) -> list[dict]:
    """Ours with 1..N teachers of the 4x shape; N=1 is the 4x comparison's run (reused)."""
    rows = []
    for n in cfg["teachers"]:
        if n == 1:
            teach, r = one_teacher
        else:
            dirs = [models[f"t4x_{i}"]["dir"] for i in range(n)]
            teach = _teach(cfg, root, seqs, dirs, f"n{n}", opts.threads, opts.inprocess)
            r = _repeat({"kind": "ours", "threads": opts.threads, "seqs": str(seqs), "warmup": 1, "steps": opts.steps,
                         "student": models["student"]["dir"], "heads": teach["heads"],
                         "cache_dir": teach["cache_dir"], "micro_batch": cfg["batch"],
                         "chunk_size": cfg["chunk_size"]}, opts.repeats, opts.inprocess)
        head_bytes = Path(teach["heads"][0]).stat().st_size
        rows.append({"teachers": n, "step_seconds": summarize(r["step_seconds"]),
                     "peak_rss_mib": summarize([x / MIB for x in r["peak_rss"]]),
                     "teach_peak_rss_mib": teach["peak_rss"] / MIB,
                     "head_loads_per_step": r["runs"][0]["head_loads_per_step"],
                     "max_resident_heads": r["runs"][0]["max_resident_heads"],
                     "our_teacher_side_mib": 2 * head_bytes / MIB,  # one resident + one prefetched head
                     "trl_teachers_resident_mib": n * models["t4x_0"]["param_bytes"] / MIB})
    return rows


def print_results(res: dict) -> None:
    rows = [[c["teacher"], f"{c['teacher_params'] / 1e6:.1f}M", side, fmt(c[name]["tokens_per_s"]),
             fmt(c[name]["tokens_per_s_with_prefill"]), fmt(c["trl"]["tokens_per_s"]),
             f"{c[name]['ratio_tokens_per_s']:.2f}x", f"{c[name]['ratio_tokens_per_cpu_s']:.2f}x",
             f"{c[name]['ratio_tokens_per_s_with_prefill']:.2f}x",
             fmt(c[name]["peak_rss_mib"]), fmt(c["trl"]["peak_rss_mib"])]
            for c in res["comparisons"] for name, side in (("ours", "padded"), ("ours_packed", "packed"))]
    print_table(f"OPD training step vs trl.DistillationTrainer (student {res['student_params'] / 1e6:.1f}M params; "
                "median [min-max])",
                ["teacher", "params", "ours", "ours tok/s", "ours+prefill", "TRL tok/s", "ratio", "ratio CPU", "ratio+prefill",
                 "ours RSS MiB", "TRL RSS MiB"], rows)
    rows = [[r["teachers"], fmt(r["step_seconds"]), fmt(r["peak_rss_mib"]), f"{r['teach_peak_rss_mib']:.0f}",
             f"{r['our_teacher_side_mib']:.1f}", f"{r['trl_teachers_resident_mib']:.0f}",
             max(r["head_loads_per_step"]), r["max_resident_heads"]] for r in res["teacher_sweep"]]
    print_table("Teachers of the 4x shape: ours measured, TRL's approach computed",
                ["N", "step s", "train RSS MiB", "teach RSS MiB", "our heads MiB", "TRL teachers MiB",
                 "loads/step", "resident"], rows)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if child_main(argv, run_named_child):
        return {}
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None, help="fresh processes per configuration")
    p.add_argument("--steps", type=int, default=None, help="timed steps per process")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--inprocess", action="store_true", help="no subprocesses (peak RSS then meaningless)")
    p.add_argument("--out", default=None, help="results directory (default bench/results)")
    opts = p.parse_args(argv)
    cfg = QUICK if opts.quick else FULL
    opts.repeats = opts.repeats or (1 if opts.quick else 2)
    opts.steps = opts.steps or (1 if opts.quick else 3)
    with tempfile.TemporaryDirectory(prefix="bench-opd-") as tmp:
        root = Path(tmp)
        models = build_models(cfg, root)
        seqs = root / "seqs.json"
        write_sequences(cfg, seqs)
        comparisons = [compare_one(cfg, root, models, seqs, t, opts) for t in ("t1x", "t4x_0")]
        sweep = teacher_sweep(cfg, root, models, seqs, opts, comparisons[1].pop("_raw"))
        comparisons[0].pop("_raw")
    res = {"config": cfg, "quick": opts.quick, "repeats": opts.repeats, "steps_per_process": opts.steps,
           "threads": opts.threads, "inprocess": opts.inprocess, "student_params": models["student"]["params"],
           "comparisons": comparisons, "teacher_sweep": sweep,
           "targets": {"ours_over_trl_tokens_per_s_4x_teacher": {"target": 1.5,
                                                                 "measured": comparisons[1]["ratio_tokens_per_s"]},
                       "ours_packed_with_prefill_over_trl_tokens_per_s_4x_teacher": {
                           "target": 1.5, "measured": comparisons[1]["ours_packed"]["ratio_tokens_per_s_with_prefill"]},
                       "train_peak_rss_n_max_over_n1": sweep[-1]["peak_rss_mib"]["median"]
                       / sweep[0]["peak_rss_mib"]["median"]}}
    write_results("opd_vs_trl", res, opts.out)
    print_results(res)
    return res


if __name__ == "__main__":
    main()
