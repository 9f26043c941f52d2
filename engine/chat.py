"""Chat rendering with loss masks, token-exact with the tokenizer's chat template.

`render` turns a conversation into token ids and a loss mask that is 1 exactly on the
assistant's own tokens (its content and the `<|end|>` that closes its turn): prompts,
role markers, and tool results are never trained on. Segments are tokenized one by one,
so the mask boundaries are exact; `tests/unit/test_chat.py` checks the concatenation is
identical to `tokenizer.apply_chat_template`.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.tokenizer import EOS, ROLE_TOKENS

ROLES = tuple(ROLE_TOKENS)


@dataclass(frozen=True)
class Rendered:
    input_ids: list[int]
    loss_mask: list[int]


def _segments(message: dict) -> list[tuple[str, bool]]:
    """(text, trained) pieces of one message, in order."""
    role = message.get("role")
    if role not in ROLE_TOKENS:
        raise ValueError(f"message role {role!r} is not one of {list(ROLE_TOKENS)}")
    content = message.get("content")
    if not isinstance(content, str):
        raise ValueError(f"message content must be a string, got {type(content).__name__}")
    if role == "tool":
        return [(f"{ROLE_TOKENS['tool']}<tool_response>{content}</tool_response>{EOS}", False)]
    if role == "assistant":
        return [(ROLE_TOKENS["assistant"], False), (content + EOS, True)]
    return [(f"{ROLE_TOKENS[role]}{content}{EOS}", False)]


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render(messages: list[dict], tokenizer, add_generation_prompt: bool = False) -> Rendered:
    """Token ids and assistant-only loss mask of a conversation."""
    ids: list[int] = []
    mask: list[int] = []
    for message in messages:
        for text, trained in _segments(message):
            piece = encode(tokenizer, text)
            ids.extend(piece)
            mask.extend([int(trained)] * len(piece))
    if add_generation_prompt:
        piece = encode(tokenizer, ROLE_TOKENS["assistant"])
        ids.extend(piece)
        mask.extend([0] * len(piece))
    return Rendered(ids, mask)


def prompt_messages(messages: list[dict]) -> list[dict]:
    """The conversation up to (excluding) the first assistant message."""
    for i, message in enumerate(messages):
        if message.get("role") == "assistant":
            return list(messages[:i])
    return list(messages)


def render_prompt(messages: list[dict], tokenizer) -> list[int]:
    """Prompt ids ending in the assistant generation marker."""
    return render(prompt_messages(messages), tokenizer, add_generation_prompt=True).input_ids


def tool_result_ids(tokenizer, result: str) -> list[int]:
    """Tokens appended after a tool call: close the assistant turn, the tool's result,
    and reopen the assistant turn (all masked out of the loss)."""
    return encode(
        tokenizer,
        f"{EOS}{ROLE_TOKENS['tool']}<tool_response>{result}</tool_response>{EOS}{ROLE_TOKENS['assistant']}",
    )
