"""Reasoning kept across tool turns (DeepSeek-V4): in a multi-turn tool episode the
context the model sees at turn 2 holds turn 1's `<think>` content, in the rollout (the
token stream the generator is given) and in the template's rendering of the conversation
(what SFT trains on), with the tiny tokenizer and the toy Qwen3 (ChatML) one. Qwen3's own
template drops earlier turns' reasoning; ours keep it."""

import pytest

from engine import chat
from engine.generation import Completion, SamplingParams
from engine.modes import mode_template_kwargs
from engine.rollout import rollout
from engine.tokenizer import build_tiny_tokenizer
from engine.toy_hf import build_toy_tokenizer

TURN1 = '<think>I need the weather in Paris first</think><tool_call><invoke name="weather"></invoke></tool_call>'
TURN2 = "<think>the tool said sunny</think>\\boxed{sunny}"
REASONING = "I need the weather in Paris first"


class Scripted:
    """Answers turn k with the k-th scripted text; records each turn's contexts."""

    def __init__(self, tok, eos):
        self.tok, self.eos, self.contexts = tok, eos, []

    def generate(self, prompts, sampling):
        turn = len(self.contexts)
        self.contexts.append([list(p) for p in prompts])
        text = [TURN1, TURN2][turn]
        ids = chat.encode(self.tok, text) + ([] if turn == 0 else [self.eos])
        return [Completion(ids, [-0.5] * len(ids), "stop") for _ in prompts]


class Env:
    def execute(self, call_text):
        assert "weather" in call_text
        return "sunny"


@pytest.mark.parametrize("build", [build_tiny_tokenizer, build_toy_tokenizer], ids=["tiny", "toy_hf"])
@pytest.mark.parametrize("mode", [None, "think-high"])
def test_turn_two_context_keeps_turn_one_reasoning(build, mode):
    tok = build()
    eos = chat.end_of_turn_ids(tok)[-1]
    user = [{"role": "user", "content": "Weather in Paris?"}]
    prompt = chat.render_prompt(user, tok, **mode_template_kwargs(mode))
    gen = Scripted(tok, eos)
    sampling = SamplingParams(n=1, temperature=1.0, max_new_tokens=64, stop_token_ids=[chat.tool_call_end_id(tok)])
    (traj,) = rollout(gen, [prompt], sampling, tokenizer=tok, environment=Env(), max_turns=3)
    assert traj.num_turns == 2 and len(gen.contexts) == 2
    seen = tok.decode(gen.contexts[1][0])
    assert REASONING in seen and "sunny" in seen  # turn 1's reasoning and the tool's result
    # the context equals the template's rendering of the conversation so far (+ generation prompt)
    so_far = user + [{"role": "assistant", "content": TURN1}, {"role": "tool", "content": "sunny"}]
    rendered = chat.render_text(so_far, tok, add_generation_prompt=True, **mode_template_kwargs(mode))
    assert seen == rendered
    assert "the tool said sunny" in traj.text and REASONING in traj.text
    # SFT on the whole episode trains on both turns' reasoning, and not on the tool result
    full = chat.render(so_far + [{"role": "assistant", "content": TURN2}], tok, **mode_template_kwargs(mode))
    trained = tok.decode([t for t, m in zip(full.input_ids, full.loss_mask) if m])
    assert REASONING in trained and "the tool said sunny" in trained and "sunny</tool_response>" not in trained
