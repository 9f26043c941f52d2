"""Where an OPD student's reverse KL to its teacher sits: per response position and per
target token, for one domain, from a finished OPD stage's cached teacher states.

    .venv/bin/python scripts/opd_kl_by_position.py [--run runs/tiny] [--round 5] [--domain ifeval]

Uses the stage's latest student checkpoint, `round-<r>/rollouts.jsonl`, the round's cache
and the extracted heads, so it recomputes exactly the per-token KL the loss saw (fp32).
A round's cache is deleted once its checkpoint is written unless the run kept it
(`opd.keep_caches: 1` keeps the last round's).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/tiny")
    p.add_argument("--round", type=int, default=None, help="default: the last round")
    p.add_argument("--domain", default="ifeval")
    a = p.parse_args()

    import torch
    from safetensors.torch import load_file

    from distill.cache import CacheReader
    from distill.kl import compute_rmsnorm_logits
    from engine.checkpoint import CheckpointManager
    from engine.model import load_model, load_tokenizer

    torch.set_num_threads(1)
    opd = Path(a.run) / "opd"
    rounds = sorted(int(d.name.split("-")[1]) for d in opd.glob("round-*"))
    rnd = rounds[-1] if a.round is None else a.round
    if not (opd / f"round-{rnd}" / "cache").is_dir():
        raise SystemExit(f"{opd / f'round-{rnd}' / 'cache'} is gone: round caches are deleted once their "
                         "checkpoint is written; rerun OPD with opd.keep_caches >= 1 to keep the newest")
    student_dir = str(CheckpointManager(opd / "checkpoints").latest())
    student, tok = load_model(student_dir).eval(), load_tokenizer(student_dir)
    samples = {}
    for line in (opd / f"round-{rnd}" / "rollouts.jsonl").read_text().splitlines():
        s = json.loads(line)
        samples[s["sample_id"]] = s
    heads = {int(h.parent.name.split("-")[1]): load_file(str(h)) for h in opd.glob("heads/teacher-*/head.safetensors")}
    eps = json.loads((Path(student_dir) / "config.json").read_text()).get("rms_norm_eps", 1e-6)
    by_pos, by_tok, ent_s, ent_t = collections.defaultdict(list), collections.defaultdict(list), [], []
    for t, sid, hidden in CacheReader(opd / f"round-{rnd}" / "cache", prefetch=False).iter_samples():
        s = samples[sid]
        if s["domain"] != a.domain:
            continue
        ids = torch.tensor([s["input_ids"]])  # (1, T)
        mask = torch.tensor(s["loss_mask"])[1:] > 0  # targets t >= 1
        with torch.no_grad():
            lps = torch.log_softmax(student(ids).logits[0, :-1][mask], -1)  # (N, V)
            lpt = torch.log_softmax(compute_rmsnorm_logits(hidden, heads[t]["norm.weight"], eps,
                                                           heads[t]["proj.weight"]), -1)  # (N, V)
        kl = (lps.exp() * (lps - lpt)).sum(-1)  # (N,)
        ent_s.append(float(-(lps.exp() * lps).sum(-1).mean()))
        ent_t.append(float(-(lpt.exp() * lpt).sum(-1).mean()))
        for j, (k, y) in enumerate(zip(kl.tolist(), ids[0, 1:][mask].tolist())):
            by_pos[min(j, 40)].append(k)
            by_tok[tok.convert_ids_to_tokens(y)].append(k)
    if not ent_s:
        raise SystemExit(f"no {a.domain!r} samples in round {rnd} of {opd}")
    n = sum(len(v) for v in by_pos.values())
    print(json.dumps({"round": rnd, "domain": a.domain, "samples": len(ent_s), "tokens": n,
                      "mean_kl": round(sum(sum(v) for v in by_pos.values()) / n, 4),
                      "student_entropy": round(sum(ent_s) / len(ent_s), 4),
                      "teacher_entropy": round(sum(ent_t) / len(ent_t), 4)}))
    print("KL by response position (40 = 40 and later):",
          " ".join(f"{p}:{sum(v) / len(v):.2f}" for p, v in sorted(by_pos.items())))
    top = sorted(((sum(v), len(v), k) for k, v in by_tok.items()), reverse=True)[:12]
    print("KL mass by target token (token, count, sum):", [(k, c, round(m, 1)) for m, c, k in top])


if __name__ == "__main__":
    main()
