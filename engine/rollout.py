"""Rollouts: sample responses to prompts, single-turn or multi-turn with a tool environment.

Multi-turn (tool domain): the sampling params carry the id of `</tool_call>` in
`stop_token_ids`. A turn that ends there is a tool call: the environment executes it,
`engine.chat.tool_result_ids` (close the assistant turn, the tool's result, reopen the
assistant turn) is appended with loss mask 0, and generation continues on the whole
context (earlier turns are kept, nothing is summarised). An episode ends at an
end-of-turn token (EOS or the template's, `engine.chat.end_of_turn_ids`), at a
turn that hits `max_new_tokens`, when the response would exceed the total budget, or
when the model calls a tool on its last allowed turn. Each turn batches all episodes
still active into one `generator.generate` call. An environment with `bind(prompt_ids)`
(real tool rows, `engine.row_tools`) gives each episode its own; a turn is a tool call
when it stopped at a stop id that does not end the turn (`</tool_call>`); a call in the
model's native Hermes JSON form (Qwen3, ChatML; engine.tool_formats) is rewritten in the
XML form the environment parses. Families whose call is the whole turn, ended by the
end-of-turn token (`tool_format` in engine.tool_formats.TURN_END_FORMATS: Llama 3 JSON,
DeepSeek's tool-call tokens, Mistral's `[TOOL_CALLS]`) need no stop id: a turn that ends
its turn is a call when its answer, decoded with special tokens kept, parses as one; the
result comes back as the template renders a tool message after a call turn
(`engine.chat.call_result_ids`). A call written inside reasoning (in a reasoning block
that is still open, the prompt's open block included; the model's markers,
engine.chat.reasoning_markers) is not executed: the episode ends there ("stop"), and the
reward sees unfinished reasoning.

`Trajectory.finish_reason`: "stop" (end of turn, or a stop token when there is no environment),
"length" (a turn hit `max_new_tokens` or the response hit the total budget; the budget
cut happens before a tool result that would not fit, or inside the model's turn) and
"max_turns" (a tool call on the last turn, left unanswered).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

from engine.chat import encode, end_of_turn_ids, tool_result_ids
from engine.generation import Completion, SamplingParams, row_seed
from engine.tool_formats import TURN_END_FORMATS

TOOL_CALL_OPEN = "<tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"


class Environment(Protocol):
    def execute(self, call_text: str) -> str: ...


def _bind(environment, prompt_ids: list[int]):
    """An environment per episode: `environment.bind(prompt)` where it has one (a row's own
    tools, engine.row_tools), else the shared environment."""
    bind = getattr(environment, "bind", None)
    return bind(prompt_ids) if callable(bind) else environment


@dataclass
class Trajectory:
    prompt_ids: list[int]
    response_ids: list[int]  # model tokens + injected tool-result tokens, everything after the prompt
    response_mask: list[int]  # 1 on model-generated tokens only
    rollout_logprobs: list[float]  # aligned with response_ids; 0 where masked
    num_turns: int
    finish_reason: str  # "stop" | "length" | "max_turns"
    text: str  # what the verifier reads: each model turn decoded (special tokens skipped), each tool
    # result as `<tool_response>result</tool_response>` (not the template's markup around it)


@dataclass
class _Episode:
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    response_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    num_turns: int = 0
    finish_reason: str | None = None
    environment: object = None
    pieces: list[str] = field(default_factory=list)  # the verifier's text, turn by turn
    lead_ids: list[int] = field(default_factory=list)  # what came right before the current turn
    template_kwargs: dict = field(default_factory=dict)  # the prompt's template kwargs (its mode): tool results

    def add(self, ids: list[int], logprobs: list[float] | None) -> None:
        self.response_ids += ids
        self.response_mask += [0 if logprobs is None else 1] * len(ids)
        self.logprobs += [0.0] * len(ids) if logprobs is None else list(logprobs)


def tool_call_text(tokenizer, turn_ids: list[int]) -> str:
    """What the environment executes: this turn's text from its last `<tool_call>` on."""
    text = tokenizer.decode(turn_ids, skip_special_tokens=True)
    start = text.rfind(TOOL_CALL_OPEN)
    return text[start:] if start >= 0 else text


def call_in_reasoning(tokenizer, lead_ids: list[int], turn_ids: list[int]) -> bool:
    """Whether this turn's tool call lies inside a reasoning block that is still open
    (opened in the turn, or by `lead_ids`, what came right before the turn: the prompt, or
    the injected tool result ending in the generation prompt): it is not executed."""
    from engine.chat import reasoning_markers
    from engine.reasoning import prompt_opens_reasoning, split_reasoning

    markers = reasoning_markers(tokenizer)
    text = tokenizer.decode(turn_ids, skip_special_tokens=True)
    start = text.rfind(TOOL_CALL_OPEN)
    opened = prompt_opens_reasoning(tokenizer.decode(lead_ids, skip_special_tokens=False), markers)
    return split_reasoning(text[:max(start, 0)], opened=opened, markers=markers).unfinished


def _step(ep: _Episode, done: Completion, *, budget: int, call_ids: set[int], tokenizer, max_turns: int,
          end_ids: set[int] = frozenset(), tool_format: str | None = None) -> None:
    """Apply one generated turn to an episode; execute its tool call if it made one."""
    room = budget - len(ep.response_ids)
    ep.num_turns += 1
    if len(done.token_ids) > room:
        ep.add(done.token_ids[:room], done.logprobs[:room])
        ep.pieces.append(tokenizer.decode(done.token_ids[:room], skip_special_tokens=True))
        ep.finish_reason = "length"
        return
    ep.add(done.token_ids, done.logprobs)
    ep.pieces.append(tokenizer.decode(done.token_ids, skip_special_tokens=True))
    if done.finish_reason == "length":
        ep.finish_reason = "length"
        return
    if ep.environment is not None and tool_format in TURN_END_FORMATS:
        _native_step(ep, done, budget=budget, end_ids=end_ids, tokenizer=tokenizer, max_turns=max_turns,
                     tool_format=tool_format)
        return
    if ep.environment is None or done.token_ids[-1] not in call_ids:  # ended its turn, not at a tool call
        ep.finish_reason = "stop"
        return
    if call_in_reasoning(tokenizer, ep.lead_ids, done.token_ids):
        ep.finish_reason = "stop"  # a call inside the reasoning is not executed
        return
    if ep.num_turns >= max_turns:
        ep.finish_reason = "max_turns"
        return
    from engine.tool_formats import canonical_calls_in_text, tool_format_of

    # the model's native call (Qwen3 / Hermes JSON) in the form the environment parses
    result = ep.environment.execute(canonical_calls_in_text(tool_call_text(tokenizer, done.token_ids),
                                                            tool_format_of(tokenizer)))
    if not isinstance(result, str):
        raise TypeError(f"environment.execute must return str, got {type(result).__name__}")
    _inject(ep, tool_result_ids(tokenizer, result, **ep.template_kwargs), result, budget)


def _inject(ep: _Episode, injected: list[int], result: str, budget: int) -> None:
    if len(ep.response_ids) + len(injected) >= budget:  # no room left for the model to answer
        ep.finish_reason = "length"
        return
    ep.add(injected, None)
    ep.lead_ids = injected
    ep.pieces.append(f"{TOOL_RESPONSE_OPEN}{result}{TOOL_RESPONSE_CLOSE}")


def _native_step(ep: _Episode, done: Completion, *, budget: int, end_ids: set[int], tokenizer, max_turns: int,
                 tool_format: str) -> None:
    """A turn (already added, its text piece the plain decode) of a family whose call is
    the whole turn ended by its end-of-turn token (engine.tool_formats.TURN_END_FORMATS):
    a call when its answer parses as one (read with special tokens kept, since the markers
    are special tokens), else the episode's final answer. The call is executed in the XML
    form the environment parses; the verifier's piece is the turn's reasoning and that XML;
    the result comes back as the template renders a tool message after a call turn
    (engine.chat.call_result_ids)."""
    from engine.chat import call_result_ids
    from engine.chat import reasoning_markers
    from engine.reasoning import prompt_opens_reasoning
    from engine.tool_formats import canonical_call_text, message_calls, native_call_turn

    ep.finish_reason = "stop"
    if done.token_ids[-1] not in end_ids:
        return
    markers = reasoning_markers(tokenizer)
    opened = prompt_opens_reasoning(tokenizer.decode(ep.lead_ids, skip_special_tokens=False), markers)
    turn = native_call_turn(tokenizer.decode(done.token_ids, skip_special_tokens=False), tool_format, opened=opened,
                            markers=markers)
    if turn is None:  # an answer, or a call inside reasoning that never closed (not executed)
        return
    ep.pieces[-1] = tokenizer.decode(encode(tokenizer, turn.reasoning), skip_special_tokens=True) + \
        canonical_call_text(turn.calls)
    if ep.num_turns >= max_turns:
        ep.finish_reason = "max_turns"
        return
    ep.finish_reason = None
    if turn.error is not None:
        result = f"error: malformed tool call: {turn.error}"
    else:
        result = ep.environment.execute(canonical_call_text(turn.calls))
        if not isinstance(result, str):
            raise TypeError(f"environment.execute must return str, got {type(result).__name__}")
    _inject(ep, call_result_ids(tokenizer, message_calls(turn.calls), result, **ep.template_kwargs), result, budget)


def _turn_seed(seed: int | None, turn: int) -> int | None:
    return None if seed is None else row_seed(seed, turn, 0x7475726E)  # "turn"


def rollout(generator, prompt_ids_list: list[list[int]], sampling: SamplingParams, *, tokenizer,
            environment: Environment | None = None, max_turns: int = 4,
            max_response_tokens: int | None = None, tool_format: str | None = None,
            template_kwargs: list[dict] | None = None) -> list[Trajectory]:
    """`sampling.n` trajectories per prompt, flat, prompts in order (`out[i * n + j]`).

    `max_response_tokens` bounds the whole response (model + tool tokens); default
    `max_new_tokens * max_turns` with an environment, `max_new_tokens` without.
    `tool_format` (engine.tool_formats): with one of `TURN_END_FORMATS` a call is a turn
    ended by the end of turn whose answer parses as a call (no stop id needed); otherwise
    a turn that stopped at a stop id that is not an end of turn (`</tool_call>`).
    `template_kwargs` (one dict per prompt: its mode's, `enable_thinking`) render the tool
    results of its episodes, so the next generation prompt is the one of the prompt's mode."""
    if max_turns < 1:
        raise ValueError(f"rollout: max_turns must be >= 1, got {max_turns}")
    if max_response_tokens is not None and max_response_tokens < 1:
        raise ValueError(f"rollout: max_response_tokens must be >= 1, got {max_response_tokens}")
    if environment is not None and not sampling.stop_token_ids and tool_format not in TURN_END_FORMATS:
        raise ValueError("rollout: an environment needs the tool-call end id in sampling.stop_token_ids, "
                         "or generation never stops at a tool call")
    turns = max_turns if environment is not None else 1
    budget = max_response_tokens or sampling.max_new_tokens * turns
    # A turn that stopped at a stop id that is not an end of turn (`</tool_call>`) is a tool call.
    call_ids = set(sampling.stop_token_ids) - set(end_of_turn_ids(tokenizer))
    kw = dict(budget=budget, call_ids=call_ids, tokenizer=tokenizer, max_turns=turns)
    if tool_format in TURN_END_FORMATS:
        kw.update(end_ids=set(end_of_turn_ids(tokenizer)), tool_format=tool_format)

    if template_kwargs is not None and len(template_kwargs) != len(prompt_ids_list):
        raise ValueError(f"rollout: {len(template_kwargs)} template_kwargs for {len(prompt_ids_list)} prompts")
    kwargs = template_kwargs or [{}] * len(prompt_ids_list)
    episodes = [_Episode(list(p), environment=_bind(environment, p) if environment is not None else None,
                         lead_ids=list(p), template_kwargs=dict(kw_p))
                for p, kw_p in zip(prompt_ids_list, kwargs) for _ in range(sampling.n)]
    for ep, done in zip(episodes, generator.generate(prompt_ids_list, sampling), strict=True):
        _step(ep, done, **kw)
    turn = 1
    while active := [ep for ep in episodes if ep.finish_reason is None]:
        contexts = [ep.prompt_ids + ep.response_ids for ep in active]
        turn_sampling = replace(sampling, n=1, seed=_turn_seed(sampling.seed, turn))
        for ep, done in zip(active, generator.generate(contexts, turn_sampling), strict=True):
            _step(ep, done, **kw)
        turn += 1
    return [Trajectory(ep.prompt_ids, ep.response_ids, ep.response_mask, ep.logprobs, ep.num_turns,
                       ep.finish_reason, "".join(ep.pieces))
            for ep in episodes]
