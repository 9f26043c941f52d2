"""What the policy wrote, for people to read: a few completions per step as records
(`samples.jsonl` and a wandb table through `MetricsLogger.log_samples`).

The records are picked evenly across the step's samples (every domain of a mixed step
shows up), by position, with no random draw: logging never changes a run's trajectory.
"""

from __future__ import annotations


def pick_evenly(items: list, n: int) -> list:
    """`n` items spread evenly over `items` (all of them when there are at most `n`)."""
    if n <= 0:
        return []
    if len(items) <= n:
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def prompt_text(sample, tokenizer) -> str:
    """The rendered prompt of a RolloutSample: its tokens before the first generated one."""
    first = next((i for i, m in enumerate(sample.loss_mask) if m), len(sample.input_ids))
    return tokenizer.decode(sample.input_ids[:first], skip_special_tokens=False)


def sample_record(sample, tokenizer, reward: bool = True) -> dict:
    """{route, row_id, prompt, completion, completion_ids, reward, finish_reason} (+ teacher
    for OPD, + scoring_failure for a sample scored 0 without a verdict); `completion_ids`: the response's token ids (model and tool-result tokens)."""
    first = next((i for i, m in enumerate(sample.loss_mask) if m), len(sample.input_ids))
    rec = {"route": sample.route, "row_id": sample.row_id, "prompt": prompt_text(sample, tokenizer),
           "completion": sample.text, "completion_ids": list(sample.input_ids[first:]),
           "reward": float(sample.reward) if reward else None,
           "finish_reason": sample.finish_reason}
    if sample.teacher_index is not None:
        rec["teacher"] = sample.teacher_index
    if getattr(sample, "scoring_failure", None):  # scored 0 without the verifier's verdict (rewards.failures)
        rec["scoring_failure"] = sample.scoring_failure
    return rec


def log_rollout_samples(logger, samples: list, tokenizer, step: int, reward: bool = True) -> None:
    """`logger.samples_per_step` of `samples` to the logger's samples log (if it keeps one)."""
    n = getattr(logger, "samples_per_step", 0) if logger is not None else 0
    if n and hasattr(logger, "log_samples"):
        logger.log_samples([sample_record(s, tokenizer, reward) for s in pick_evenly(samples, n)], step)
