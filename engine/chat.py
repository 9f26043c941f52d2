"""Chat through the tokenizer's own template: prompts, SFT loss masks, tool turns, stop ids.

Every path (SFT data, GRPO / mixed-RL / OPD rollouts, multi-turn tool episodes, eval)
renders conversations here, with `tokenizer.apply_chat_template`, so each model trains
and samples in its own format; no format is special-cased. Nothing assumes that a reply
is rendered as a verbatim continuation of the generation prompt: real templates rewrite
turns (Qwen3 inserts an empty `<think>` block on the last assistant turn and drops
reasoning from earlier ones, DeepSeek-R1 drops it from every turn and opens `<think>` in
its generation prompt, Mistral moves the system text into the last user turn).

- `render` gives the ids of a conversation and a loss mask that is 1 exactly on the
  assistant's tokens (its content and the end-of-turn token that closes it). Where the
  template marks assistant turns with `{% generation %}`, the mask is transformers'
  `return_assistant_tokens_mask`. Where it does not, each assistant turn is located in
  the rendering of the whole conversation by diffing renders: the end of the message
  before it is where a render with that message's content swapped for a sentinel stops
  agreeing (from the end); the reply starts after the part of the template's generation
  prompt (rendered for the conversation up to the turn) that the full rendering repeats
  there, and ends at the first end-of-turn token. An empty reasoning block the template
  inserted (the message has no reasoning of its own) is not trained on.
- `tool_result_ids` are the tokens the template puts between an assistant turn and the
  next generation prompt when a tool result follows (end of turn, the tool message in
  the template's tool role, the new assistant header): masked out of the loss.
- `reasoning_markers(tokenizer)`: the model's reasoning markers, configured
  (`engine.reasoning.set_reasoning_markers`, `model.reasoning_markers`), else read off the
  template (what it writes around `reasoning_content`), else `<think>` / `</think>`.
- `end_of_turn_ids` are the ids that end an assistant turn: the tokenizer's EOS, the
  token the template writes after an assistant message, and `generation_config`'s
  `eos_token_id`s; generators stop on them.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from pathlib import Path

from engine.reasoning import DEFAULT_MARKERS, MARKERS_ATTR, ReasoningMarkers

ROLES = ("system", "user", "assistant", "tool")
_PROBE_USER = "hi"
_PROBE_REPLY = "ok"  # plain words: templates may trim or rewrite content
_SENTINEL = "\ue000"  # a private-use character: no template trims, splits or matches it


class ChatTemplateError(ValueError):
    """The tokenizer has no chat template, or its template cannot give a loss mask."""


@dataclass(frozen=True)
class Rendered:
    input_ids: list[int]
    loss_mask: list[int]


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _check(messages: list[dict]) -> None:
    for j, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{j}]: role {role!r} is not one of {list(ROLES)}")
        content = message.get("content")
        if content is None and role == "assistant" and message.get("tool_calls"):
            continue  # a tool-call turn may have no text
        if not isinstance(content, str):
            raise ValueError(f"messages[{j}]: content must be a string, got {type(content).__name__}")


def _template(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise ChatTemplateError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                                "set model.chat_template (a Jinja file) in the experiment config")
    return template


def chat_template_of(path: str | Path) -> str | None:
    """The chat template a local HF directory ships (chat_template.jinja or
    tokenizer_config.json), None if it has none."""
    d = Path(path)
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text()
    cfg = d / "tokenizer_config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text()).get("chat_template") or None
    return None


def has_generation_markers(tokenizer) -> bool:
    return "{% generation %}" in _template(tokenizer).replace("{%-", "{%").replace("-%}", "%}")


def render_text(messages: list[dict], tokenizer, add_generation_prompt: bool = False, **template_kwargs) -> str:
    """`template_kwargs` (e.g. `enable_thinking`, engine.modes; `tools`) go to the template."""
    _template(tokenizer)
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **template_kwargs)


def _ids(messages: list[dict], tokenizer, add_generation_prompt: bool = False, **template_kwargs) -> list[int]:
    return encode(tokenizer, render_text(messages, tokenizer, add_generation_prompt, **template_kwargs))


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _content_end(messages: list[dict], j: int, tokenizer, add_generation_prompt: bool, **template_kwargs) -> int:
    """Where (a character offset) message `j`'s content ends in the rendering of
    `messages`: the point from which a render with that content swapped for a sentinel
    agrees with it to the end."""
    text = render_text(messages, tokenizer, add_generation_prompt, **template_kwargs)
    swapped = [dict(m) for m in messages]
    swapped[j]["content"] = _SENTINEL
    other = render_text(swapped, tokenizer, add_generation_prompt, **template_kwargs)
    tail = _common_prefix(text[::-1], other[::-1])
    head = _common_prefix(text, other)
    if text == other:
        raise ChatTemplateError(f"messages[{j}]: the chat template does not render this message's content in "
                                "this conversation, so its tokens cannot be found; use a template with "
                                "{% generation %} markers (model.chat_template)")
    return max(len(text) - tail, head)


def _reply_start(messages: list[dict], i: int, tokenizer, text: str, add_generation_prompt: bool,
                 **template_kwargs) -> int:
    """Where assistant message `i`'s reply starts in `text` (the whole conversation's rendering)."""
    if i == 0:
        raise ChatTemplateError("messages[0]: an assistant message needs a user (or system) message before it")
    prompt = render_text(messages[:i], tokenizer, True, **template_kwargs)
    header = prompt[_content_end(messages[:i], i - 1, tokenizer, True, **template_kwargs):]
    at = _content_end(messages, i - 1, tokenizer, add_generation_prompt, **template_kwargs)
    return at + _common_prefix(text[at:], header)


def _has_reasoning(message: dict, markers=DEFAULT_MARKERS) -> bool:
    content = message.get("content") or ""
    return bool(message.get("reasoning_content")) or markers.open in content or markers.close in content


def _empty_reasoning_len(text: str, at: int, markers=DEFAULT_MARKERS) -> int:
    """Length of an empty reasoning block (`<think>\n\n</think>\n\n`) starting at `text[at]`, or 0."""
    m = re.compile(rf"\s*{re.escape(markers.open)}\s*{re.escape(markers.close)}\s*").match(text, at)
    return m.end() - at if m else 0


def render(messages: list[dict], tokenizer, add_generation_prompt: bool = False, **template_kwargs) -> Rendered:
    """Token ids and assistant-only loss mask of a conversation (see the module docstring)."""
    _check(messages)
    if has_generation_markers(tokenizer):
        out = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                            add_generation_prompt=add_generation_prompt,
                                            return_assistant_tokens_mask=True, **template_kwargs)
        return Rendered(list(out["input_ids"]), [int(m) for m in out["assistant_masks"]])
    text = render_text(messages, tokenizer, add_generation_prompt, **template_kwargs)
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError("a template without {% generation %} markers needs a fast tokenizer (offsets)")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    mask = [0] * len(ids)
    stops = set(end_of_turn_ids(tokenizer))
    markers = reasoning_markers(tokenizer)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _reply_start(messages, i, tokenizer, text, add_generation_prompt, **template_kwargs)
        if not _has_reasoning(message, markers):
            start += _empty_reasoning_len(text, start, markers)  # a block the template inserted, not the reply
        # the reply's text must be rendered (a template that drops the turn has nothing to train);
        # a tool-call turn's text may be left out by the template (Llama 3, Mistral)
        reply_end = start if message.get("tool_calls") else _content_end(messages, i, tokenizer,
                                                                          add_generation_prompt, **template_kwargs)
        first = next((k for k, (_, b) in enumerate(offsets) if b > start), len(ids))
        end = next((k for k in range(first, len(ids)) if ids[k] in stops and offsets[k][0] >= reply_end), None)
        if end is None:
            raise ChatTemplateError(f"messages[{i}]: no end-of-turn token {sorted(stops)} after the assistant "
                                    "reply in the rendered conversation")
        mask[first:end + 1] = [1] * (end + 1 - first)
    return Rendered(ids, mask)


def prompt_messages(messages: list[dict]) -> list[dict]:
    """The conversation up to (excluding) the first assistant message."""
    for i, message in enumerate(messages):
        if message.get("role") == "assistant":
            return list(messages[:i])
    return list(messages)


def render_prompt(messages: list[dict], tokenizer, **template_kwargs) -> list[int]:
    """Prompt ids ending in the template's generation prompt."""
    prompt = prompt_messages(messages)
    _check(prompt)
    return _ids(prompt, tokenizer, True, **template_kwargs)


def row_template_kwargs(row: dict) -> dict:
    """The template kwargs of a data row: its reasoning mode's (`row["mode"]`,
    engine.modes) and its tools (`row["tools"]`, a native tool row: the template's
    `tools=` argument); {} for a row with neither (renders as before)."""
    from engine.modes import mode_template_kwargs

    kw = mode_template_kwargs(row.get("mode"))
    if row.get("tools") is not None:
        kw["tools"] = row["tools"]
    return kw


def render_row_prompt(row: dict, tokenizer) -> list[int]:
    """A data row's prompt ids, in the row's reasoning mode and with its tools where it
    has them (`row_template_kwargs`): the one prompt path of GRPO, OPD and eval."""
    return render_prompt(row["messages"], tokenizer, **row_template_kwargs(row))


def row_prompt_opens_reasoning(row: dict, tokenizer) -> bool:
    """Whether the template's generation prompt for a data row opens a reasoning block
    (DeepSeek-R1's ends in `<think>\\n`): judged on the generation prompt alone (what the
    template adds after the conversation), not on the conversation's own text."""
    from engine.reasoning import prompt_opens_reasoning

    prompt = prompt_messages(row["messages"])
    kw = row_template_kwargs(row)
    with_prompt = render_text(prompt, tokenizer, True, **kw)
    without = render_text(prompt, tokenizer, False, **kw)
    return prompt_opens_reasoning(with_prompt[_common_prefix(with_prompt, without):], reasoning_markers(tokenizer))


def render_row(row: dict, tokenizer) -> Rendered:
    """A data row's conversation and loss mask (SFT), in the row's mode and with its tools
    where it has them (`row_template_kwargs`)."""
    return render(row["messages"], tokenizer, **row_template_kwargs(row))


def _after_reply(tokenizer, then: list[dict], add_generation_prompt: bool, **template_kwargs) -> str:
    """The text the template writes after an assistant reply (followed by `then`)."""
    messages = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_REPLY}] + then
    text = render_text(messages, tokenizer, add_generation_prompt, **template_kwargs)
    return text[_content_end(messages, 1, tokenizer, add_generation_prompt, **template_kwargs):]


def tool_result_ids(tokenizer, result: str, **template_kwargs) -> list[int]:
    """Tokens appended after a tool call: close the assistant turn, the tool's result in
    the template's tool role, and reopen the assistant turn (all masked out of the loss)."""
    return encode(tokenizer, _after_reply(tokenizer, [{"role": "tool", "content": result}], True, **template_kwargs))


def call_result_ids(tokenizer, calls: list[dict], result: str, **template_kwargs) -> list[int]:
    """Tokens appended after an assistant turn that made native `calls` (message
    `tool_calls` entries) and ended at its end-of-turn token (Llama 3, DeepSeek, Mistral):
    what the template writes after that token when the tool's `result` follows, up to the
    next generation prompt (Llama 3's `ipython` turn, DeepSeek's tool outputs block,
    Mistral's `[TOOL_RESULTS]`); masked out of the loss. The tool message carries the
    first call's `id` as `tool_call_id` where the model wrote one."""
    call = {"role": "assistant", "content": "", "tool_calls": calls}
    tool = {"role": "tool", "content": result}
    if calls and calls[0].get("id"):
        tool["tool_call_id"] = calls[0]["id"]
    head = [{"role": "user", "content": _PROBE_USER}, call]
    turn = render_text(head, tokenizer, False, **template_kwargs)
    full = render_text(head + [tool], tokenizer, True, **template_kwargs)
    shared = turn[:_common_prefix(turn, full)]
    start = _content_end(head, 0, tokenizer, False, **template_kwargs)  # the call turn follows the user text
    ends = [shared.rfind(t) + len(t) for t in _end_texts(tokenizer) if shared.rfind(t) >= start]
    if not ends:
        raise ChatTemplateError(f"the chat template writes no end-of-turn token after a tool-call turn: {turn[-200:]!r}")
    return encode(tokenizer, full[max(ends):])


def _end_texts(tokenizer) -> list[str]:
    return [tokenizer.decode([i], skip_special_tokens=False) for i in end_of_turn_ids(tokenizer)]


def end_of_turn_ids(tokenizer, model_dir: str | Path | None = None) -> list[int]:
    """Ids that end an assistant turn: EOS, the template's end-of-turn token (the first
    token it writes after an assistant message, where that is a special or added token),
    and the `eos_token_id`s of `model_dir/generation_config.json` (EOS first, no repeats)."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if getattr(tokenizer, "chat_template", None):
        after = encode(tokenizer, _after_reply(tokenizer, [], False))
        added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        if after and after[0] in added:
            ids.append(int(after[0]))
    if model_dir is not None:
        path = Path(model_dir) / "generation_config.json"
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            ids.extend(int(t) for t in (eos if isinstance(eos, list) else [eos]) if t is not None)
    return list(dict.fromkeys(ids))


TOOL_CALL_END = "</tool_call>"


def tool_call_end_id(tokenizer) -> int:
    """The id of `</tool_call>`, where a multi-turn episode stops for the environment;
    it must be one token of the vocabulary (an added token), or the turn never stops there."""
    ids = encode(tokenizer, TOOL_CALL_END)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ChatTemplateError(f"{TOOL_CALL_END!r} is not a single token of this tokenizer (got {ids}); "
                                "a multi-turn tool domain needs it as an added token")
    return ids[0]


_DERIVED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_REASONING_SENTINEL = "\ue001"  # a private-use character no template trims or matches


def derive_markers(tokenizer) -> ReasoningMarkers | None:
    """The markers the chat template writes around an assistant message's
    `reasoning_content` (Qwen3: `<think>` / `</think>`), or None when it does not render
    `reasoning_content` (then the markers cannot be read off the template)."""
    user = [{"role": "user", "content": "hi"}]
    try:
        prompt = render_text(user, tokenizer, True)
        reply = {"role": "assistant", "content": "ok", "reasoning_content": _REASONING_SENTINEL}
        text = render_text(user + [reply], tokenizer)
    except Exception:  # noqa: BLE001 -- a template that cannot render this has nothing to read
        return None
    at = text.find(_REASONING_SENTINEL)
    if at < 0 or text.count(_REASONING_SENTINEL) != 1:
        return None
    before = text[:at]
    open_ = before[_common_prefix(before, prompt):].strip()  # after the generation prompt, before the reasoning
    if not open_:  # the generation prompt itself opens the block (DeepSeek-R1 style): its last piece, if a token
        words = before.split()
        last = words[-1] if words else ""
        open_ = last if last in (getattr(tokenizer, "get_added_vocab", dict)() or {}) else ""
    tail = text[at + len(_REASONING_SENTINEL):]
    ok = tail.find("ok")
    close = tail[:ok].strip() if ok >= 0 else ""
    if not open_ or not close or open_ == close or any(c.isspace() for c in open_ + close):
        return None
    return ReasoningMarkers(open_, close)


def reasoning_markers(tokenizer) -> ReasoningMarkers:
    """`tokenizer`'s reasoning markers: configured (`set_reasoning_markers`), else derived
    from its chat template (cached per tokenizer), else the default `<think>` / `</think>`."""
    configured = getattr(tokenizer, MARKERS_ATTR, None)
    if configured is not None:
        return configured
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return DEFAULT_MARKERS
    try:
        cached = _DERIVED.get(tokenizer)
    except TypeError:  # not weak-referenceable
        return derive_markers(tokenizer) or DEFAULT_MARKERS
    if cached is None:
        cached = _DERIVED[tokenizer] = derive_markers(tokenizer) or DEFAULT_MARKERS
    return cached
