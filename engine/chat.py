"""Chat through the tokenizer's own template: prompts, SFT loss masks, tool turns, stop ids.

Every path (SFT data, GRPO / mixed-RL / OPD rollouts, multi-turn tool episodes, eval)
renders conversations here, with `tokenizer.apply_chat_template`, so each model trains
and samples in its own format; no format is special-cased.

- `render` gives the ids of a conversation and a loss mask that is 1 exactly on the
  assistant's tokens (its content and the end-of-turn token that closes it). Where the
  template marks assistant turns with `{% generation %}`, the mask is transformers'
  `return_assistant_tokens_mask`; where it does not, each assistant turn is found by
  rendering the conversation up to it (with the generation prompt) and up to its end,
  and taking the difference, cut after the turn's end-of-turn token (so template
  filler such as ChatML's newline after `<|im_end|>` is not trained on).
- `tool_result_ids` are the tokens the template puts between an assistant turn that
  ended in a tool call and the next generation prompt (end of turn, the tool message in
  the template's tool role, the new assistant header): masked out of the loss.
- `end_of_turn_ids` are the ids that end an assistant turn: the tokenizer's EOS, the
  token the template writes after an assistant message, and `generation_config`'s
  `eos_token_id`s; generators stop on them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ROLES = ("system", "user", "assistant", "tool")
_PROBE_USER = "hi"
_PROBE_REPLY = "ok"  # plain words: templates may trim or rewrite content


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
        if not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{j}]: content must be a string, got {type(message.get('content')).__name__}")


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
    """`template_kwargs` (e.g. `enable_thinking`, engine.modes) go to the template as variables."""
    _template(tokenizer)
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **template_kwargs)


def _ids(messages: list[dict], tokenizer, add_generation_prompt: bool = False, **template_kwargs) -> list[int]:
    return encode(tokenizer, render_text(messages, tokenizer, add_generation_prompt, **template_kwargs))


def render(messages: list[dict], tokenizer, add_generation_prompt: bool = False, **template_kwargs) -> Rendered:
    """Token ids and assistant-only loss mask of a conversation."""
    _check(messages)
    if has_generation_markers(tokenizer):
        out = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                            add_generation_prompt=add_generation_prompt,
                                            return_assistant_tokens_mask=True, **template_kwargs)
        return Rendered(list(out["input_ids"]), [int(m) for m in out["assistant_masks"]])
    ids = _ids(messages, tokenizer, add_generation_prompt, **template_kwargs)
    mask = [0] * len(ids)
    stops = set(end_of_turn_ids(tokenizer))
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _ids(messages[:i], tokenizer, True, **template_kwargs)
        upto = _ids(messages[:i + 1], tokenizer, **template_kwargs)
        if upto[:len(before)] != before or ids[:len(upto)] != upto:
            raise ChatTemplateError(
                f"messages[{i}]: the chat template does not render this conversation as a sequence of "
                "prefixes (it rewrites earlier turns), so the assistant tokens cannot be found; "
                "use a template with {% generation %} markers (model.chat_template)")
        end = len(upto)
        for k in range(len(before), len(upto)):
            if upto[k] in stops:
                end = k + 1
                break
        mask[len(before):end] = [1] * (end - len(before))
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


def render_row_prompt(row: dict, tokenizer) -> list[int]:
    """A data row's prompt ids, in the row's reasoning mode (`row["mode"]`, engine.modes)
    where it has one: the one prompt path of GRPO, OPD and eval."""
    from engine.modes import mode_template_kwargs

    return render_prompt(row["messages"], tokenizer, **mode_template_kwargs(row.get("mode")))


def render_row(row: dict, tokenizer) -> Rendered:
    """A data row's conversation and loss mask (SFT), in the row's mode where it has one."""
    from engine.modes import mode_template_kwargs

    return render(row["messages"], tokenizer, **mode_template_kwargs(row.get("mode")))


def _after_reply(tokenizer, then: list[dict], add_generation_prompt: bool) -> str:
    """The text the template writes after an assistant reply (followed by `then`)."""
    user = [{"role": "user", "content": _PROBE_USER}]
    head = render_text(user, tokenizer, add_generation_prompt=True) + _PROBE_REPLY
    full = render_text(user + [{"role": "assistant", "content": _PROBE_REPLY}] + then, tokenizer,
                       add_generation_prompt)
    if not full.startswith(head):
        raise ChatTemplateError("the chat template does not render an assistant reply right after its generation "
                                f"prompt:\n  prompt+reply: {head!r}\n  rendered:     {full!r}")
    return full[len(head):]


def tool_result_ids(tokenizer, result: str) -> list[int]:
    """Tokens appended after a tool call: close the assistant turn, the tool's result in
    the template's tool role, and reopen the assistant turn (all masked out of the loss)."""
    return encode(tokenizer, _after_reply(tokenizer, [{"role": "tool", "content": result}], True))


def end_of_turn_ids(tokenizer, model_dir: str | Path | None = None) -> list[int]:
    """Ids that end an assistant turn: EOS, the template's end-of-turn token, and the
    `eos_token_id`s of `model_dir/generation_config.json` (EOS first, no repeats)."""
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
