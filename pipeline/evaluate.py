"""The eval driver: every model on every domain's held-out set, greedy and sampled.

For each model (base, experts, the OPD student, the mixed-RL baseline) and each domain:
- greedy score: one completion per prompt at temperature 0, mean verifier score;
- sampled pass@1: k completions per prompt at the configured temperature, the mean
  verifier score over all k samples of every prompt (with 0/1 verifiers this is the
  unbiased pass@1 estimator; with partial-credit verifiers it is the mean credit);
- pass@k: the unbiased estimator of Chen et al. (2021) over the same k samples, a
  sample counting as correct when its score is 1.

The driver takes its workers as arguments: `load_policy(model_dir)` returns a policy
`(eval_set, rows, temperature, n) -> texts` (n texts per row, in row order; multi-turn
tool episodes included), and `score(verifier, texts, references, row_ids=) -> scores`. Models are
evaluated one at a time, so only one is resident.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

Policy = Callable[["EvalSet", list, float, int], list]


@dataclass(frozen=True)
class EvalSet:
    domain: str
    verifier: str
    rows: list = field(repr=False)  # data rows: {"id", "domain", "messages", "reference"}
    environment_name: str | None = None  # a tool domain's environment (multi-turn), else None
    max_new_tokens: int | None = None  # this set's own budget (a reasoning mode's); None: the eval's


@dataclass(frozen=True)
class EvalSettings:
    samples: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 96
    max_prompts: int | None = None


def compute_pass_at_1(scores: list[list[float]]) -> float:
    """Mean over prompts of the mean score over that prompt's samples.  scores: (P, k)."""
    if not scores or any(len(s) == 0 for s in scores):
        raise ValueError("pass@1 needs at least one prompt and one sample per prompt")
    return sum(sum(s) / len(s) for s in scores) / len(scores)


def compute_pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _group(values: list, k: int) -> list[list]:
    return [values[i:i + k] for i in range(0, len(values), k)]


def _texts_and_tokens(out) -> tuple[list, list | None]:
    """A policy returns texts, or (texts, output token counts)."""
    if isinstance(out, tuple):
        return list(out[0]), list(out[1])
    return list(out), None


def _checked(texts: list, expected: int, what: str) -> list:
    if len(texts) != expected:
        raise RuntimeError(f"{what}: the policy returned {len(texts)} completions, expected {expected}")
    return texts


def _prompt_of(row: dict) -> str:
    """The row's prompt as a person reads it: its messages before the first assistant turn."""
    turns = []
    for m in row.get("messages", []):
        if m.get("role") == "assistant":
            break
        turns.append(f"{m.get('role')}: {m.get('content')}")
    return "\n".join(turns)


def evaluate_domain(policy: Policy, es: EvalSet, score, settings: EvalSettings) -> dict:
    """{'greedy', 'greedy_scores' (per prompt, in row order), 'unfinished_reasoning' (the
    fraction of greedy completions whose reasoning never closed), 'pass@1', 'pass@k', 'n',
    'completions' (every completion with its score)} for one model on one domain."""
    from engine.episode import unfinished_fraction

    rows = es.rows[: settings.max_prompts] if settings.max_prompts else es.rows
    if not rows:
        raise ValueError(f"domain {es.domain!r} has no eval rows")
    refs = [r["reference"] for r in rows]
    greedy_texts, tokens = _texts_and_tokens(policy(es, rows, 0.0, 1))
    ids = [r.get("id") for r in rows]
    greedy = score(es.verifier, _checked(greedy_texts, len(rows), f"{es.domain} greedy"), refs, row_ids=ids)
    out = {"greedy": sum(greedy) / len(greedy), "n": len(rows), "greedy_scores": [float(x) for x in greedy],
           "unfinished_reasoning": unfinished_fraction(greedy_texts)}  # scored 0 (engine.episode)
    prompts = [_prompt_of(r) for r in rows]
    out["completions"] = [{"kind": "greedy", "row_id": r.get("id"), "prompt": p, "completion": t, "score": float(x)}
                          for r, p, t, x in zip(rows, prompts, greedy_texts, greedy)]
    if tokens is not None:  # mean output tokens of the greedy answers (reasoning modes' cost)
        out["greedy_tokens"] = sum(tokens) / len(tokens)
    k = settings.samples
    if k > 0:
        texts, _ = _texts_and_tokens(policy(es, rows, settings.temperature, k))
        texts = _checked(texts, len(rows) * k, f"{es.domain} sampled")
        flat = score(es.verifier, texts, [ref for ref in refs for _ in range(k)],
                     row_ids=[i for i in ids for _ in range(k)])
        per_prompt = _group(flat, k)  # (P, k)
        out["completions"] += [{"kind": f"sampled-{i % k}", "row_id": rows[i // k].get("id"), "prompt": prompts[i // k],
                                "completion": t, "score": float(x)} for i, (t, x) in enumerate(zip(texts, flat))]
        out["pass@1"] = compute_pass_at_1(per_prompt)
        out["pass@k"] = sum(compute_pass_at_k(k, sum(s >= 1.0 for s in p), k) for p in per_prompt) / len(rows)
    return out


def evaluate_model(policy: Policy, sets: list[EvalSet], score, settings: EvalSettings,
                   log: Callable[[str], None] = print, name: str = "") -> dict:
    """One model's entry: {'greedy': {domain: x}, 'sampled': ..., 'pass_at_k': ..., 'n_eval': ...}."""
    entry: dict = {"greedy": {}, "greedy_per_prompt": {}, "sampled": {}, "pass_at_k": {}, "n_eval": {}}
    for es in sets:
        r = evaluate_domain(policy, es, score, settings)
        entry["greedy"][es.domain] = r["greedy"]
        entry["greedy_per_prompt"][es.domain] = r["greedy_scores"]
        entry["n_eval"][es.domain] = r["n"]
        entry.setdefault("unfinished_reasoning", {})[es.domain] = r["unfinished_reasoning"]
        entry.setdefault("completions", {})[es.domain] = r["completions"]  # eval/samples.jsonl, not results
        if "greedy_tokens" in r:
            entry.setdefault("output_tokens", {})[es.domain] = r["greedy_tokens"]
        if "pass@1" in r:
            entry["sampled"][es.domain] = r["pass@1"]
            entry["pass_at_k"][es.domain] = r["pass@k"]
        log(f"[eval] {name:<12} {es.domain:<8} greedy {r['greedy']:.3f}"
            + (f"  unfinished reasoning {r['unfinished_reasoning']:.3f}" if r["unfinished_reasoning"] else "")
            + (f"  pass@1 {r['pass@1']:.3f}  pass@{settings.samples} {r['pass@k']:.3f}" if "pass@1" in r else ""))
    return entry


def evaluate_models(models: dict[str, str], sets: list[EvalSet], load_policy: Callable[[str], Policy],
                    score, settings: EvalSettings, log: Callable[[str], None] = print,
                    done: dict[str, dict] | None = None,
                    on_model: Callable[[str, dict], None] | None = None) -> dict:
    """The results table of `eval/results.json` (shape in docs/CONTRACTS.md).

    `done` holds entries of models already evaluated (an interrupted eval resumes without
    redoing them); `on_model(name, entry)` is called as each model finishes.
    """
    entries = dict(done or {})
    for name, model_dir in models.items():
        if name in entries:
            log(f"[eval] {name:<12} already evaluated (an earlier attempt or a worker)")
            continue
        started = time.time()
        policy = load_policy(model_dir)
        entry = evaluate_model(policy, sets, score, settings, log, name)
        close = getattr(policy, "close", None)
        if callable(close):
            close()
        del policy
        entries[name] = {**entry, "seconds": round(time.time() - started, 2)}
        if on_model is not None:
            on_model(name, entries[name])
    return assemble_results({n: entries[n] for n in models}, settings)


def assemble_results(entries: dict[str, dict], settings: EvalSettings) -> dict:
    """Per-model entries -> {'models': greedy table, 'sampled', 'pass_at_k', 'n_eval', ...}."""
    results: dict = {"models": {}, "greedy_per_prompt": {}, "sampled": {}, "pass_at_k": {}, "n_eval": {},
                     "seconds": {},
                     "settings": {"samples": settings.samples, "temperature": settings.temperature,
                                  "max_new_tokens": settings.max_new_tokens, "max_prompts": settings.max_prompts}}
    for name, e in entries.items():
        results["models"][name] = e["greedy"]
        if e.get("greedy_per_prompt"):  # absent in entries written before it existed
            results["greedy_per_prompt"][name] = e["greedy_per_prompt"]
        if e["sampled"]:
            results["sampled"][name] = e["sampled"]
            results["pass_at_k"][name] = e["pass_at_k"]
        results["n_eval"].update(e["n_eval"])
        if e.get("output_tokens"):
            results.setdefault("output_tokens", {})[name] = e["output_tokens"]
        if e.get("unfinished_reasoning"):  # absent in entries written before it existed
            results.setdefault("unfinished_reasoning", {})[name] = e["unfinished_reasoning"]
        results["seconds"][name] = e.get("seconds")
    return results


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of `b - a` over the same prompts and its standard error (sample std / sqrt(n)).

    Both models answer the same held-out prompts, so the difference is paired: the SE of the
    per-prompt differences, not of two independent means, says whether a gap is noise."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired_difference needs two equal-length lists of >= 2 scores, got {len(a)} and {len(b)}")
    d = [y - x for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    return mean, math.sqrt(var / len(d))


def paired_difference_of_domain_means(a: dict[str, list[float]], b: dict[str, list[float]]) -> tuple[float, float]:
    """Mean over domains of each domain's paired `b - a`, and its standard error.

    Each domain has its own held-out prompts, so the per-domain differences are independent
    and the SE of their mean is sqrt(sum of the squared per-domain SEs) / the domain count."""
    if not a or set(a) != set(b):
        raise ValueError(f"paired_difference_of_domain_means needs the same domains, got {sorted(a)} and {sorted(b)}")
    parts = [paired_difference(a[d], b[d]) for d in sorted(a)]
    return sum(m for m, _ in parts) / len(parts), math.sqrt(sum(se * se for _, se in parts)) / len(parts)


def model_label(stage: str) -> str:
    """The results-table name of a model stage: 'prepare' -> 'base', 'opd' -> 'student'."""
    return {"prepare": "base", "opd": "student"}.get(stage, stage)


def models_to_evaluate(stage_names: list[str]) -> list[str]:
    """The model-producing stages among `stage_names`, base first, in graph order."""
    kinds = ("prepare", "sft", "grpo", "mixed_rl", "opd")
    return [s for s in stage_names if s.split(":")[0] in kinds]
