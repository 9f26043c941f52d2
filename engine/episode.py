"""Episodes: the one path from data rows to scored samples that GRPO, mixed RL, OPD and
eval all take (docs/DESIGN.md section 4).

`roll_out` renders one route's rows with the model's chat template
(`engine.chat.render_row_prompt`), samples `n` responses per row (single-turn, or
multi-turn with the route's tool environment: generation stops at `</tool_call>` exactly
when the route has an environment), through the rollout log when the caller gives one
(`engine.rollout_wal.logged_rollout`), and returns one `RolloutSample` per response.
`verified_results` / `verified_scores` / `score_samples` score responses with the route's
verifier over the scorer pool, raising only when the verifier itself failed on at least the
scorer's `max_error_rate` of a batch (`rewards.batch.check_verifier_errors`; default: all of
it); below that a failure is its row's 0, and the sample's `scoring_failure` says why. The verifier reads the answer only: the
completion split by `engine.reasoning.split_reasoning` (`<think>` blocks removed); a
completion whose reasoning never closes scores 0 with the reason "unfinished reasoning"
and is not sent to the verifier. A sample whose prompt opened the reasoning block
(DeepSeek-R1's generation prompt ends in `<think>\n`) is split as starting inside it
(`RolloutSample.scored_text`).

`RolloutSample` is the record a sample stays from rollout to loss: GRPO fills `reward`
and `advantage` (experts.rl_batch packs it into trainer batches), OPD its `sample_id`,
`teacher_index` and `policy_version` (distill.opd, distill.cache). OPD's
`round-r/rollouts.jsonl` holds one `to_opd_record` per line: the keys it has always
had, where "domain" is the route (`from_opd_record` reads it back).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.domain_spec import DomainSpec
from engine.modes import split_route

# the keys of an OPD rollouts.jsonl line, in the order they are written
OPD_RECORD_KEYS = ("sample_id", "domain", "teacher_index", "row_id", "input_ids", "loss_mask", "rollout_logprobs",
                   "finish_reason", "text", "reference")


@dataclass
class RolloutSample:
    """One sampled response, from rollout to loss."""
    input_ids: list[int]  # prompt + response (model and tool-result tokens)
    loss_mask: list[int]  # aligned with input_ids: 1 on model-generated response tokens
    rollout_logprobs: list[float]  # aligned with input_ids, 0 where not generated
    finish_reason: str  # engine.rollout.Trajectory.finish_reason
    text: str  # the decoded response: what the verifier reads
    reference: object  # the row's reference answer / tests / checks
    route: str  # the key the rows were rolled out under: a domain, or domain@mode (OPD routes)
    row_id: object = None
    mode: str | None = None  # the row's reasoning mode (engine.modes), None without modes
    max_response_tokens: int | None = None  # the most response tokens its episode could hold (Dr. GRPO)
    reward: float = 0.0  # GRPO: the shaped verifier score
    advantage: float = 0.0  # GRPO: from its group's rewards
    sample_id: str = ""  # OPD: the cache key
    teacher_index: int | None = None  # OPD: the teacher it is routed to
    policy_version: int | None = None  # pipelined OPD: rounds of training in the weights that sampled it
    reasoning_opened: bool = False  # the prompt ends inside a reasoning block (engine.reasoning)
    tool_format: str | None = None  # a tool episode's native call format (engine.tool_formats)
    reasoning_markers: object = None  # the model's markers (engine.reasoning.ReasoningMarkers); None: the default
    scoring_failure: str | None = None  # why its score is not the verifier's verdict (verifier error, timeout)

    @property
    def scored_text(self) -> str:
        """The completion as rewards read it: the model's reasoning markers written as the
        default `<think>` / `</think>`, with the open marker the prompt wrote in front where
        the prompt opened the block (engine.reasoning), native tool calls in the XML form
        the tool verifier parses (engine.tool_formats)."""
        from engine.reasoning import DEFAULT_MARKERS, canonical_reasoning
        from engine.tool_formats import canonical_calls_in_text

        text = canonical_calls_in_text(canonical_reasoning(self.text, self.reasoning_markers), self.tool_format)
        return DEFAULT_MARKERS.open + text if self.reasoning_opened else text

    @property
    def domain(self) -> str:
        return split_route(self.route)[0]

    @property
    def num_model_tokens(self) -> int:
        return sum(self.loss_mask)

    @classmethod
    def from_trajectory(cls, t, row: dict, route: str, max_response_tokens: int | None = None,
                        reasoning_opened: bool = False) -> RolloutSample:
        """A sample of `row` from its rollout `t` (engine.rollout.Trajectory)."""
        p = len(t.prompt_ids)
        return cls(input_ids=list(t.prompt_ids) + list(t.response_ids), loss_mask=[0] * p + list(t.response_mask),
                   rollout_logprobs=[0.0] * p + list(t.rollout_logprobs), finish_reason=t.finish_reason,
                   text=t.text, reference=row.get("reference"), route=route, row_id=row.get("id"),
                   mode=row.get("mode"), max_response_tokens=max_response_tokens,
                   reasoning_opened=reasoning_opened)

    def to_opd_record(self, with_rewards: bool = False) -> dict:
        """The line of OPD's rollouts.jsonl ("domain" holds the route; `policy_version`
        only when set; `reward` and `advantage` with `with_rewards`)."""
        rec = {"sample_id": self.sample_id, "domain": self.route, "teacher_index": self.teacher_index,
               "row_id": self.row_id, "input_ids": self.input_ids, "loss_mask": self.loss_mask,
               "rollout_logprobs": self.rollout_logprobs, "finish_reason": self.finish_reason, "text": self.text,
               "reference": self.reference}
        if self.policy_version is not None:
            rec["policy_version"] = self.policy_version
        if with_rewards:  # OPD with a reward term: the verifier's score and the group advantage
            rec["reward"], rec["advantage"] = self.reward, self.advantage
        return rec

    @classmethod
    def from_opd_record(cls, rec: dict, where: str = "rollouts.jsonl") -> RolloutSample:
        """Inverse of `to_opd_record`; a line missing a key or carrying an unknown one is an
        error naming `where` (a file written by another version)."""
        missing = [k for k in OPD_RECORD_KEYS if k not in rec]
        unknown = sorted(set(rec) - set(OPD_RECORD_KEYS) - {"policy_version", "reward", "advantage"})
        if missing or unknown:
            raise ValueError(f"{where}: sample {rec.get('sample_id')!r} is not an OPD rollout record "
                             f"(missing keys {missing}, unknown keys {unknown})")
        n = len(rec["input_ids"])
        if len(rec["loss_mask"]) != n or len(rec["rollout_logprobs"]) != n:
            raise ValueError(f"{where}: sample {rec['sample_id']!r}: loss_mask ({len(rec['loss_mask'])}) and "
                             f"rollout_logprobs ({len(rec['rollout_logprobs'])}) must match input_ids ({n})")
        return cls(input_ids=rec["input_ids"], loss_mask=rec["loss_mask"], rollout_logprobs=rec["rollout_logprobs"],
                   finish_reason=rec["finish_reason"], text=rec["text"], reference=rec["reference"],
                   route=rec["domain"], row_id=rec["row_id"], mode=split_route(rec["domain"])[1],
                   sample_id=rec["sample_id"], teacher_index=rec["teacher_index"],
                   policy_version=rec.get("policy_version"), reward=float(rec.get("reward", 0.0)),
                   advantage=float(rec.get("advantage", 0.0)))


def roll_out(rows: list[dict], route: str, spec: DomainSpec, *, generator, tokenizer, n: int, temperature: float,
             max_new_tokens: int, max_turns: int, seed: int | None = None, top_p: float = 1.0,
             max_response_tokens: int | None = None, wal=None, wal_key: str | None = None) -> list[RolloutSample]:
    """`n` samples of each of `rows` (flat, rows in order: `out[i * n + j]`), rolled out
    under `route` with its spec's tool environment (multi-turn, stopping at `</tool_call>`, or for
    a family whose call ends its turn -- Llama 3, DeepSeek, Mistral -- at the end of turn:
    engine.tool_formats.TURN_END_FORMATS)
    or without one (single-turn). `max_response_tokens` bounds a whole episode (default:
    `engine.rollout.rollout`'s). With `wal` (engine.rollout_wal.RolloutWAL) the batch is
    replayed from the log under `wal_key` when it is there with the same inputs."""
    from engine.chat import render_row_prompt, row_prompt_opens_reasoning, tool_call_end_id
    from engine.generation import SamplingParams
    from engine.rollout_wal import logged_rollout

    if wal is not None and not wal_key:
        raise ValueError(f"roll_out({route!r}): a rollout log needs a wal_key")
    from engine.chat import reasoning_markers
    from engine.reasoning import DEFAULT_MARKERS
    from engine.tool_formats import TURN_END_FORMATS, tool_format_of

    env = spec.environment
    fmt = tool_format_of(tokenizer) if env is not None else None
    # a call ends at `</tool_call>`, or (TURN_END_FORMATS: Llama 3, DeepSeek, Mistral) at the end of turn
    stops = [tool_call_end_id(tokenizer)] if env is not None and fmt not in TURN_END_FORMATS else []
    sampling = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                              stop_token_ids=stops, seed=seed)
    prompts = [render_row_prompt(r, tokenizer) for r in rows]
    extra = {"tool_format": fmt} if fmt in TURN_END_FORMATS else {}
    if env is not None and any(r.get("mode") is not None for r in rows):  # tool results in the row's mode
        from engine.modes import mode_template_kwargs

        extra["template_kwargs"] = [mode_template_kwargs(r.get("mode")) for r in rows]
    trajs = logged_rollout(wal, wal_key, generator, prompts, sampling, tokenizer=tokenizer, environment=env,
                           max_turns=max_turns, max_response_tokens=max_response_tokens, **extra)
    opened = [row_prompt_opens_reasoning(r, tokenizer) for r in rows]
    samples = [RolloutSample.from_trajectory(t, rows[i // n], route, max_response_tokens, opened[i // n])
               for i, t in enumerate(trajs)]
    markers = reasoning_markers(tokenizer)
    if markers != DEFAULT_MARKERS:
        for s in samples:
            s.reasoning_markers = markers
    if env is not None:
        for s in samples:
            s.tool_format = fmt
    return samples


MAX_FAILURE_LINES = 10  # per scored batch: the stage log's lines for rows scored 0 without a verdict


def report_scoring_failures(results: list, verifier: str, where: str, row_ids: list | None = None,
                            log=None) -> int:
    """One line per result that is not `verifier`'s verdict (rewards.failures: it raised, ran
    out of time, its worker died), naming `where`, the row (`row_ids[i]`, else the item's
    index) and the verifier, the first MAX_FAILURE_LINES of them (then how many more); `log`
    defaults to printing to the stage log. Returns how many there were."""
    from rewards.failures import scoring_failure

    log = log or (lambda line: print(line, flush=True))
    failed = [(i, reason) for i, r in enumerate(results) if (reason := scoring_failure(r.info))]
    for i, reason in failed[:MAX_FAILURE_LINES]:
        row = f"row {row_ids[i]!r}" if row_ids is not None else f"item {i}"
        log(f"{where}: {row} scored 0 without a verdict from verifier {verifier!r}: {reason[:500]}")
    if len(failed) > MAX_FAILURE_LINES:
        log(f"{where}: ... and {len(failed) - MAX_FAILURE_LINES} more of {len(results)} items scored 0 "
            f"without a verdict from verifier {verifier!r}")
    return len(failed)


def verified_results(scorer, verifier: str, texts: list[str], references: list, where: str,
                     row_ids: list | None = None) -> list:
    """`verifier`'s results (rewards.RewardResult) on the answers of `texts`
    (engine.reasoning.split_reasoning) over the scorer pool; a text whose reasoning never
    closes gets 0 with reason "unfinished reasoning" without being scored. A batch on
    which the verifier itself failed at the scorer's `max_error_rate` (default: on every
    item) raises, naming `where`; below it a failure is its row's 0, and a line in the stage
    log names the row (`row_ids`, aligned with `texts`), the verifier and the reason
    (`report_scoring_failures`)."""
    from engine.reasoning import UNFINISHED, split_reasoning
    from rewards.batch import DEFAULT_MAX_ERROR_RATE, check_verifier_errors
    from rewards.registry import RewardResult

    splits = [split_reasoning(t) for t in texts]
    todo = [i for i, sp in enumerate(splits) if not sp.unfinished]
    results = [RewardResult(0.0, {"reason": UNFINISHED}) for _ in texts]
    if todo:
        got = scorer.score(verifier, [splits[i].answer for i in todo], [references[i] for i in todo])
        for i, r in zip(todo, got, strict=True):
            results[i] = r
        report_scoring_failures(results, verifier, where, row_ids)
        check_verifier_errors(got, verifier, where, getattr(scorer, "max_error_rate", DEFAULT_MAX_ERROR_RATE))
    return results


def verified_scores(scorer, verifier: str, texts: list[str], references: list, where: str,
                    row_ids: list | None = None) -> list[float]:
    """The scores of `verified_results`."""
    return [r.score for r in verified_results(scorer, verifier, texts, references, where, row_ids)]


def score_samples(scorer, spec: DomainSpec, samples: list[RolloutSample], where: str) -> list[float]:
    """The samples' scores by their route's verifier (`verified_results`, on `scored_text`); each
    sample's `scoring_failure` is set to the reason its score is not a verdict (`rewards.failures`)."""
    from rewards.failures import scoring_failure

    results = verified_results(scorer, spec.verifier, [s.scored_text for s in samples],
                               [s.reference for s in samples], where, row_ids=[s.row_id for s in samples])
    for s, r in zip(samples, results, strict=True):
        s.scoring_failure = scoring_failure(r.info)
    return [r.score for r in results]


def unfinished_fraction(texts: list[str]) -> float:
    """The fraction of `texts` whose reasoning never closes (engine.reasoning), 0 for none."""
    from engine.reasoning import split_reasoning

    return sum(split_reasoning(t).unfinished for t in texts) / len(texts) if texts else 0.0
