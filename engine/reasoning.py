"""Reasoning and answer: one split of a completion that every reward path uses.

A completion is split by the model's reasoning markers (`<think>` / `</think>` by
default, `ReasoningMarkers` otherwise): every closed block is reasoning, the rest is the
answer (stripped; a text with no reasoning block is its own answer, byte for byte). A
close marker with no open marker before it closes a block that the generation prompt
opened (DeepSeek-R1's prompt ends in `<think>\\n`): everything before it is reasoning.
A block that never closes -- opened in the completion, or by the prompt (`opened=True`)
-- makes the whole rest reasoning and the split `unfinished`: the answer is empty and
rewards give it 0 ("unfinished reasoning").

Verifiers score `answer` only, so a `\\boxed{}` draft, a last number or a broken
constraint inside the reasoning does not count; tool calls written inside reasoning are
not executed (engine.rollout).

A model's markers (`engine.chat.reasoning_markers(tokenizer)`) are the experiment's
`model.reasoning_markers` where set (`set_reasoning_markers`, pipeline.stage_io), else
derived from the chat template (the text it writes around an assistant message's
`reasoning_content`), else `<think>` / `</think>`. Code that reads the model's own text
(loss masks, tool calls in rollouts, the prompt's open block) uses them; the text rewards
read is written with the default markers (`canonical_reasoning`), so every split after it
is the default one.
"""

from __future__ import annotations

from dataclasses import dataclass

UNFINISHED = "unfinished reasoning"


@dataclass(frozen=True)
class ReasoningMarkers:
    open: str = "<think>"
    close: str = "</think>"

    def __post_init__(self):
        if not self.open or not self.close or self.open == self.close:
            raise ValueError(f"reasoning markers must be two different non-empty strings, got "
                             f"{self.open!r} and {self.close!r}")


DEFAULT_MARKERS = ReasoningMarkers()


@dataclass(frozen=True)
class Split:
    reasoning: str
    answer: str
    unfinished: bool  # a reasoning block never closed


def split_reasoning(text: str, opened: bool = False, markers: ReasoningMarkers = DEFAULT_MARKERS) -> Split:
    """`text` split into reasoning and answer; `opened`: the generation prompt already
    opened a reasoning block (the completion starts inside it)."""
    o, c = markers.open, markers.close
    reasoning, answer = [], []
    pos = 0
    inside = opened
    first_close = text.find(c)
    if not opened and first_close >= 0 and not 0 <= text.find(o) < first_close:
        inside = True  # a close with no open before it: the prompt opened the block
    while True:
        if inside:
            j = text.find(c, pos)
            if j < 0:
                reasoning.append(text[pos:])
                return Split("".join(reasoning), "".join(answer).strip(), True)
            reasoning.append(text[pos:j])
            pos, inside = j + len(c), False
            continue
        i = text.find(o, pos)
        if i < 0:
            if not reasoning:  # no reasoning at all: the answer is the text exactly as written
                return Split("", text, False)
            answer.append(text[pos:])
            return Split("".join(reasoning), "".join(answer).strip(), False)
        answer.append(text[pos:i])
        pos, inside = i + len(o), True


def prompt_opens_reasoning(prompt_text: str, markers: ReasoningMarkers = DEFAULT_MARKERS) -> bool:
    """Whether a rendered prompt ends inside a reasoning block (its last open marker has no
    close after it): the completion starts in the reasoning."""
    i = prompt_text.rfind(markers.open)
    return i >= 0 and prompt_text.find(markers.close, i) < 0


MARKERS_ATTR = "_polymath_reasoning_markers"  # set on a tokenizer by set_reasoning_markers (survives pickling)


def set_reasoning_markers(tokenizer, markers: ReasoningMarkers | None) -> None:
    """Fix `tokenizer`'s reasoning markers (the experiment's `model.reasoning_markers`);
    None: derive them from its template (engine.chat.reasoning_markers)."""
    setattr(tokenizer, MARKERS_ATTR, markers)


def canonical_reasoning(text: str, markers: ReasoningMarkers | None) -> str:
    """`text` with `markers` written as the default `<think>` / `</think>` (what every
    reward split reads); `text` itself, byte for byte, with the default markers or None."""
    if markers is None or markers == DEFAULT_MARKERS:
        return text
    return text.replace(markers.open, DEFAULT_MARKERS.open).replace(markers.close, DEFAULT_MARKERS.close)
