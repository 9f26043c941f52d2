"""GRPO stage driver: one domain's expert (or the mixed-RL baseline over all domains).

Each step: take prompts -> sample G completions each (multi-turn with the domain's tool
environment where there is one) -> score with the domain's verifier -> group advantages
-> old (and reference) log-probs -> `epochs_per_step` passes over `mini_batches_per_step`
optimiser steps -> push the new weights to the generator. The driver receives its
workers (`trainer`, `generator`, `scorer`, `reference`) as arguments; it does not know whether they
are local objects or Ray actor groups.

Departures from the paper: clip-higher (DAPO) bounds by default; dynamic sampling and
overlong filtering are options; sequences are scored by the same function the eval uses.

Wiring that matters for correctness:
- the trainer's log-probs are taken under the distribution the generator sampled from
  (temperature, top-k, top-p travel in the batch; `engine.logprobs`), so the rollout
  log-probs and the trainer's agree on the sampled tokens;
- off-policy sequence masking (`offpolicy_mask_delta`) compares the current policy with
  the rollout (behaviour) log-probs; its rate is `train/offpolicy_masked_frac`;
- Dr. GRPO's constant is each sample's own domain's response budget: `max_new_tokens`
  single-turn, `max_new_tokens * max_turns` for a tool episode (the budget the rollout
  is given);
- a step left with no sample to train on (all groups dropped by dynamic sampling, or
  every sample truncated under overlong filtering) is skipped, counted in
  `step_skipped` / `steps_skipped`; it is never trained on by fallback.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from engine.domain_spec import DomainSpec
from engine.episode import RolloutSample, unfinished_fraction
from engine.prompt_stream import PromptStream
from engine.samples import log_rollout_samples
from experts.advantages import compute_advantages
from experts.grpo_settings import GRPOSettings
from experts.rl_batch import build_minibatches


def logprob_temperature(sampling_temperature: float) -> float:
    """The temperature a trainer divides its logits by: the sampler's, or 1 for greedy."""
    return sampling_temperature if sampling_temperature > 0 else 1.0


def logprob_sampling(s: GRPOSettings) -> dict:
    """The distribution the generator's log-probs are of (`engine.generation`): temperature
    and top-p when sampling; plain `log_softmax(logits)` when greedy."""
    if s.temperature == 0:
        return {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    return {"temperature": s.temperature, "top_k": 0, "top_p": s.top_p}


def response_budget(s: GRPOSettings, spec: DomainSpec) -> int:
    """The most response tokens an episode of this domain can hold: `max_new_tokens`
    single-turn, `max_new_tokens * max_turns` with a tool environment. The rollout gets
    exactly this budget, and Dr. GRPO divides by it."""
    return s.max_new_tokens * (s.max_turns if spec.environment is not None else 1)


class GRPOLoss:
    """Picklable loss closure sent to trainer ranks: flat hyperparameters only."""

    def __init__(self, s: GRPOSettings):
        self.kw = dict(policy_loss=s.policy_loss, clip_low=s.clip_low, clip_high=s.clip_high,
                       kl_beta=s.kl_beta, kl_estimator=s.kl_estimator, loss_agg=s.loss_agg,
                       offpolicy_mask_delta=s.offpolicy_mask_delta, tis_cap=s.tis_cap)

    def __call__(self, hidden, weight, batch):
        from engine.logprobs import compute_chunked_token_logprobs
        from engine.trainer_common import batch_sampling
        from experts.losses import compute_policy_loss

        # the policy being optimised is the one sampled from: filter(softmax(logits / T)), as
        # in verl; T, top-k, top-p travel with the batch, so the loss, the old/reference and
        # the rollout log-probs are all of the same distribution
        from engine.batching import unpack_to_samples

        logprobs = compute_chunked_token_logprobs(hidden, weight, batch["input_ids"],
                                                  **batch_sampling(batch))  # (B, T)
        # packed rows (R, T) -> the samples' (S, L): the loss and its normalisers see the padded batch's layout
        logprobs = unpack_to_samples(logprobs, batch)
        return compute_policy_loss(
            logprobs=logprobs,
            # one optimiser step per batch: pi_old == pi_theta, so the ratio is exactly 1
            old_logprobs=batch["old_logprobs"] if "old_logprobs" in batch else logprobs.detach(),
            advantages=batch["advantages"],
            mask=batch["loss_mask"],
            ref_logprobs=batch.get("ref_logprobs"),
            rollout_logprobs=batch.get("rollout_logprobs"),
            global_tokens=batch["global_tokens"],
            global_seqs=batch["global_seqs"],
            max_len=batch["max_len"],
            **self.kw,
        )


def _sample_round(settings, stream, domains, rows_needed, *, generator, scorer, tokenizer, step_seed, rnd, wal=None,
                  clock=None):
    """Roll out and score `rows_needed` prompts (engine.episode); returns per-group sample
    lists. With a rollout log (`wal`), each domain's batch is replayed from it when logged
    there. `clock` (a dict) accumulates the seconds spent in `generate` and `score`."""
    from engine.episode import roll_out, score_samples
    from engine.reasoning import canonical_reasoning

    G = settings.group_size
    rows = stream.take(rows_needed)
    groups: list[list[RolloutSample]] = []
    by_domain: dict[str, list[dict]] = {}
    for r in rows:
        by_domain.setdefault(r["domain"], []).append(r)
    for dom, drows in sorted(by_domain.items()):
        spec = domains[dom]
        budget = response_budget(settings, spec)
        t0 = time.perf_counter()
        samples = roll_out(drows, dom, spec, generator=generator, tokenizer=tokenizer, n=G,
                           temperature=settings.temperature, top_p=settings.top_p,
                           max_new_tokens=settings.max_new_tokens, max_turns=settings.max_turns,
                           seed=step_seed * 1000 + rnd, max_response_tokens=budget,
                           wal=wal, wal_key=f"seed-{step_seed}/rnd-{rnd}/{dom}")
        t1 = time.perf_counter()
        scores = score_samples(scorer, spec, samples, f"GRPO rollouts (seed {step_seed}), domain {dom!r}")
        # the format verifier and the modes' think penalty read the model's markers as <think>/</think>
        texts = [canonical_reasoning(s.text, s.reasoning_markers) for s in samples]
        if settings.format_weight > 0:
            fmt = scorer.score("format", texts, [s.reference for s in samples])
            scores = [(1 - settings.format_weight) * x + settings.format_weight * f.score
                      for x, f in zip(scores, fmt)]
        if spec.modes:  # per-mode shaping (experts.mode_rewards): think tokens, length past the budget
            from experts.mode_rewards import shape_mode_rewards

            scores = shape_mode_rewards(scores, texts, [s.num_model_tokens for s in samples],
                                        [s.mode for s in samples], spec.modes)
        for s, x in zip(samples, scores, strict=True):
            s.reward = float(x)
        if clock is not None:
            clock["generate"] = clock.get("generate", 0.0) + t1 - t0
            clock["score"] = clock.get("score", 0.0) + time.perf_counter() - t1
        groups += [samples[g * G:(g + 1) * G] for g in range(len(drows))]
    return groups


def collect_step(settings: GRPOSettings, stream: PromptStream, domains: dict[str, DomainSpec], *,
                 generator, scorer, tokenizer, step: int, wal=None) -> tuple[list[list[RolloutSample]], dict]:
    """Sample one step's groups, with dynamic sampling (refill groups whose rewards are all
    equal from the next prompts, up to `max_sampling_rounds`)."""
    from rewards.failures import ITEM_TIMEOUT, VERIFIER_ERROR

    kept: list[list[RolloutSample]] = []
    all_groups: list[list[RolloutSample]] = []
    rounds = settings.max_sampling_rounds if settings.dynamic_sampling else 1
    clock: dict[str, float] = {}
    for rnd in range(rounds):
        need = settings.prompts_per_step - len(kept)
        groups = _sample_round(settings, stream, domains, need, generator=generator, scorer=scorer,
                               tokenizer=tokenizer, step_seed=settings.seed + step, rnd=rnd, wal=wal, clock=clock)
        all_groups.extend(groups)
        for g in groups:
            if not settings.dynamic_sampling or len({s.reward for s in g}) > 1:
                kept.append(g)
        if len(kept) >= settings.prompts_per_step:
            break
    kept = kept[: settings.prompts_per_step]
    flat = [s for g in all_groups for s in g]
    stats = {
        "reward_mean": sum(s.reward for s in flat) / len(flat),
        "reward_std": float(torch.tensor([s.reward for s in flat]).std()) if len(flat) > 1 else 0.0,
        "response_len": sum(s.num_model_tokens for s in flat) / len(flat),
        "truncated_frac": sum(s.finish_reason == "length" for s in flat) / len(flat),
        "unfinished_reasoning_frac": unfinished_fraction([s.scored_text for s in flat]),
        "groups_kept": len(kept),
        "groups_sampled": len(all_groups),
        "groups_dropped": len(all_groups) - len(kept),  # all-equal rewards (dynamic sampling) or surplus
        "sampling_rounds": rnd + 1,
        # rows scored 0 because the verifier raised / the item ran out of time (rewards.failures)
        "verifier_errors": sum(1 for s in flat if (s.scoring_failure or "").startswith(VERIFIER_ERROR)),
        "scoring_timeouts": sum(1 for s in flat if (s.scoring_failure or "").startswith(ITEM_TIMEOUT)),
        "scoring_failures": sum(1 for s in flat if s.scoring_failure),
        "completions_scored": len(flat),
        # within time/generate_score: the rollouts (tool calls included) and the verifiers
        "time/generate": clock.get("generate", 0.0),
        "time/score": clock.get("score", 0.0),
    }
    per_domain: dict[str, list[float]] = {}
    for s in flat:
        per_domain.setdefault(s.domain, []).append(s.reward)
    for d, rs in per_domain.items():
        stats[f"reward/{d}"] = sum(rs) / len(rs)
    return kept, stats


def with_advantages(groups: list[list[RolloutSample]], advantages: list[list[float]], *,
                    drop_truncated: bool) -> list[RolloutSample]:
    """The step's samples, flat, each a copy carrying its advantage (`groups` is left as
    it is); with `drop_truncated` (overlong filtering) truncated samples are left out: they
    count in their group's baseline, get no gradient. May return [] (step skipped)."""
    flat = [replace(s, advantage=a) for g, adv in zip(groups, advantages, strict=True)
            for s, a in zip(g, adv, strict=True)]
    return [s for s in flat if s.finish_reason != "length"] if drop_truncated else flat


def run_grpo(settings: GRPOSettings, *, trainer, generator, scorer, tokenizer, train_rows: list[dict],
             domains: dict[str, DomainSpec], out_dir: str | Path, reference=None, logger=None,
             checkpoints=None) -> dict:
    """Train for `settings.steps`, resuming from `checkpoints.latest()` if there is one."""
    from engine import weight_sync_check
    from engine.rollout_wal import StepLogs

    out_dir = Path(out_dir)
    probe = weight_sync_check.probe_ids(tokenizer) if weight_sync_check.enabled() else None
    stream = PromptStream(train_rows, seed=settings.seed)
    start, extra = 0, {}
    resume = checkpoints.latest() if checkpoints is not None else None  # verified (checksums)
    if resume is not None:
        extra = trainer.load_checkpoint(resume)
        stream.load_state_dict(extra["prompt_stream"])
        start = extra["step"]
        generator.load_weights(trainer.state_dict())
        if logger is not None and hasattr(logger, "truncate_after"):
            logger.truncate_after(start)
    loss_fn = GRPOLoss(settings)
    last = {}
    skipped = extra.get("steps_skipped", 0) if resume is not None else 0
    # rows scored 0 without the verifier's verdict, over the whole stage (the manifest's counts)
    failures = ScoringFailures(**((extra.get("scoring_failures") or {}) if resume is not None else {}))
    wal_logs = StepLogs(out_dir / "rollout-wal", carried=extra.get("rollout_wal"), start_step=start)
    sync_gap = lambda: weight_sync_check.weight_sync_gap(generator, trainer, probe,  # noqa: E731
                                                         pad_id=tokenizer.pad_token_id)
    gap_before = sync_gap() if probe is not None else None  # the engine's start (or resume) weights
    for step in range(start, settings.steps):
        t0 = time.time()
        wal = wal_logs.open(step)  # the step's finished rollout batches, replayed after a kill
        groups, stats = collect_step(settings, stream, domains, generator=generator, scorer=scorer,
                                     tokenizer=tokenizer, step=step, wal=wal)
        wal_logs.closed(wal)
        t_gen = time.time()
        advantages = compute_advantages([[s.reward for s in g] for g in groups], settings.advantage)
        samples = with_advantages(groups, advantages, drop_truncated=settings.overlong_filter)
        stats["samples_trained"] = len(samples)
        if samples:
            train_metrics = _optimise(settings, samples, trainer=trainer, reference=reference,
                                      loss_fn=loss_fn, pad_id=tokenizer.pad_token_id, step=step)
            t_train = time.time()
            generator.load_weights(trainer.state_dict())
        else:  # nothing left to learn from: no optimiser step, the weights are unchanged
            skipped += 1
            train_metrics, t_train = {}, time.time()
        t_sync = time.time()
        if probe is not None:  # POLYMATH_CHECK_WEIGHT_SYNC: the engine serves what the trainer holds
            stats["weight_sync/logprob_gap"] = sync_gap()
            if gap_before is not None:
                stats["weight_sync/logprob_gap_before"], gap_before = gap_before, None
        failures.add(stats, groups, domains)
        ntok = sum(len(s.input_ids) for s in samples)
        last = {"step": step + 1, **stats, **train_metrics, "step_skipped": int(not samples),
                "steps_skipped": skipped,
                "time/generate_score": t_gen - t0, "time/train": t_train - t_gen,
                "time/sync": t_sync - t_train, "tokens_per_s": ntok / max(t_train - t_gen, 1e-9)}
        if logger is not None:
            logger.log(last, step=step + 1)
            log_rollout_samples(logger, [s for g in groups for s in g], tokenizer, step + 1)
        if checkpoints is not None and ((step + 1) % settings.save_every == 0 or step + 1 == settings.steps):
            carried = wal_logs.carry(step + 1)
            checkpoints.save(trainer, step + 1, {"step": step + 1, "prompt_stream": stream.state_dict(),
                                                 "steps_skipped": skipped, "rollout_wal": carried,
                                                 "scoring_failures": failures.state()})
            wal_logs.checkpointed(step + 1, carried)
    return {**last, **{f"rollout_wal/{k}": v for k, v in wal_logs.counts().items()}, **failures.metrics(),
            **({"note": failures.note()} if failures.failed else {})}


class ScoringFailures:
    """The stage's count of completions scored 0 without their verifier's verdict (it
    raised, ran past its time limit, its worker died: rewards.failures) and the first
    reason, with its row and verifier, for the manifest's metrics and note. Each such
    row is also a line in the stage log (engine.episode.report_scoring_failures)."""

    def __init__(self, scored: int = 0, failed: int = 0, verifier_errors: int = 0, timeouts: int = 0,
                 first: str = ""):
        self.scored, self.failed, self.verifier_errors, self.timeouts, self.first = \
            scored, failed, verifier_errors, timeouts, first

    def add(self, stats: dict, groups: list[list[RolloutSample]], domains: dict[str, DomainSpec]) -> None:
        self.scored += stats["completions_scored"]
        self.failed += stats["scoring_failures"]
        self.verifier_errors += stats["verifier_errors"]
        self.timeouts += stats["scoring_timeouts"]
        if not self.first:
            s = next((s for g in groups for s in g if s.scoring_failure), None)
            if s is not None:
                self.first = (f"row {s.row_id!r} (verifier {domains[s.domain].verifier!r}): "
                              f"{s.scoring_failure[:300]}")

    def state(self) -> dict:
        return dict(scored=self.scored, failed=self.failed, verifier_errors=self.verifier_errors,
                    timeouts=self.timeouts, first=self.first)

    def metrics(self) -> dict:
        return {"scoring/failed": self.failed, "scoring/verifier_errors": self.verifier_errors,
                "scoring/timeouts": self.timeouts, "scoring/completions": self.scored}

    def note(self) -> str:
        first = f"; first: {self.first}" if self.first else ""
        return (f"{self.failed} of {self.scored} completions scored 0 without a verdict "
                f"({self.verifier_errors} verifier errors, {self.timeouts} timeouts){first}; each in stage.log")


def _optimise(settings, samples, *, trainer, reference, loss_fn, pad_id, step) -> dict:
    """Old/ref log-probs, then epochs x mini-batches optimiser steps; mean metrics."""
    minibatches = build_minibatches(samples, settings.mini_batches_per_step, settings.micro_batch_size,
                                    pad_id=pad_id, seed=settings.seed + step, **logprob_sampling(settings),
                                    micro_batch_tokens=settings.micro_batch_tokens)
    on_policy = settings.epochs_per_step == 1 and len(minibatches) == 1
    for micro_batches in minibatches:
        for mb in micro_batches:
            if not on_policy:  # otherwise the loss uses its own detached log-probs (no extra forward)
                mb["old_logprobs"] = trainer.forward_logprobs(mb).detach()
            if settings.kl_beta > 0:
                if reference is None:
                    raise ValueError("kl_beta > 0 needs a reference model")
                mb["ref_logprobs"] = reference.forward_logprobs(mb).detach()
    agg: dict[str, list[float]] = {}
    for _ in range(settings.epochs_per_step):
        for micro_batches in minibatches:
            metrics = trainer.train_step(micro_batches, loss_fn)
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    agg.setdefault(k, []).append(float(v))
    return {f"train/{k}": sum(v) / len(v) for k, v in agg.items()}

