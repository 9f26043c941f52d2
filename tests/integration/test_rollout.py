"""Multi-turn tool rollouts: a scripted generator forces a tool call deterministically, so
the episode's exact token layout, loss mask and log-probs can be checked; a real tiny HF
model then proves the plumbing (contexts keep earlier turns: the model's own teacher-forced
log-probs over the finished trajectory equal the rollout's, on exactly the masked-in tokens)."""

import re
from types import SimpleNamespace

import pytest
import torch

from engine.chat import encode, render_prompt, tool_result_ids
from engine.generation import Completion, HFGenerator, SamplingParams
from engine.model import TinySpec, load_tokenizer, materialize_tiny
from engine.rollout import rollout, tool_call_text
from engine.tokenizer import build_tiny_tokenizer

torch.set_num_threads(1)
CALL = ('Let me add.<tool_call><invoke name="add"><parameter name="a">2</parameter>'
        '<parameter name="b">3</parameter></invoke></tool_call>')


class AddEnvironment:
    """Deterministic fake tool: adds the parameters of an `add` call."""

    def __init__(self):
        self.calls = []

    def execute(self, call_text: str) -> str:
        self.calls.append(call_text)
        nums = re.findall(r'<parameter name="\w+">(-?\d+)</parameter>', call_text)
        return str(sum(int(x) for x in nums)) if nums else "error: no parameters"


class ScriptedGenerator:
    """Answers each context with the next scripted turn for its prompt; log-probs are
    distinct recognisable values (-(turn + 1) - position / 100)."""

    def __init__(self, tok, scripts: dict[tuple, list[str]], stop_texts=("</tool_call>",)):
        self.tok, self.scripts, self.calls = tok, scripts, []
        self.stop_ids = {tok.convert_tokens_to_ids(t) for t in stop_texts} | {tok.eos_token_id}

    def _script_for(self, context):
        for prompt, turns in self.scripts.items():
            if tuple(context[:len(prompt)]) == prompt:
                done = context[len(prompt):].count(self.tok.convert_tokens_to_ids("<tool_response>"))
                return turns[done], done
        raise AssertionError("unknown context")

    def generate(self, prompt_ids, sampling):
        self.calls.append(([list(p) for p in prompt_ids], sampling))
        out = []
        for p in prompt_ids:
            text, turn = self._script_for(p)
            ids = encode(self.tok, text)[: sampling.max_new_tokens]
            hit = next((i for i, t in enumerate(ids) if t in self.stop_ids), None)
            ids = ids if hit is None else ids[: hit + 1]
            reason = "stop" if hit is not None else "length"
            lps = [-(turn + 1) - i / 100 for i in range(len(ids))]
            out += [Completion(ids, lps, reason)] * sampling.n
        return out


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def _prompt(tok, text):
    return render_prompt([{"role": "user", "content": text}], tok)


def _tool_sampling(tok, **kw):
    return SamplingParams(stop_token_ids=[tok.convert_tokens_to_ids("</tool_call>")], **kw)


def test_tool_episode_layout_mask_and_logprobs(tok):
    prompt = _prompt(tok, "What is 2+3?")
    answer = "The answer is 5.<|end|>"
    gen = ScriptedGenerator(tok, {tuple(prompt): [CALL, answer]})
    env = AddEnvironment()
    [t] = rollout(gen, [prompt], _tool_sampling(tok, max_new_tokens=64, seed=0), tokenizer=tok,
                  environment=env, max_turns=3)

    turn1, injected, turn2 = encode(tok, CALL), tool_result_ids(tok, "5"), encode(tok, answer)
    assert t.prompt_ids == prompt
    assert t.response_ids == turn1 + injected + turn2
    # the loss mask covers exactly the model's tokens: both turns, not the tool's result
    assert t.response_mask == [1] * len(turn1) + [0] * len(injected) + [1] * len(turn2)
    assert t.rollout_logprobs == ([-1 - i / 100 for i in range(len(turn1))] + [0.0] * len(injected)
                                  + [-2 - i / 100 for i in range(len(turn2))])
    assert (t.num_turns, t.finish_reason) == (2, "stop")
    # the verifier's text: the call, the tool's result, the final answer (specials dropped)
    assert t.text == CALL + "<tool_response>5</tool_response>" + "The answer is 5."
    assert env.calls == [CALL[CALL.index("<tool_call>"):]]
    # the second turn continued on the whole context (first turn kept), one sample per episode
    (ctx1, s1), (ctx2, s2) = gen.calls
    assert ctx1 == [prompt] and ctx2 == [prompt + turn1 + injected]
    assert s2.n == 1 and s2.seed != s1.seed


def test_only_active_episodes_are_batched(tok):
    p_tool, p_direct = _prompt(tok, "2+3?"), _prompt(tok, "hi")
    gen = ScriptedGenerator(tok, {tuple(p_tool): [CALL, "5<|end|>"], tuple(p_direct): ["hello<|end|>"]})
    trajs = rollout(gen, [p_tool, p_direct], _tool_sampling(tok, n=2, max_new_tokens=64), tokenizer=tok,
                    environment=AddEnvironment(), max_turns=4)
    assert [t.num_turns for t in trajs] == [2, 2, 1, 1]
    assert [t.text for t in trajs[2:]] == ["hello", "hello"]
    assert all(sum(t.response_mask) == len(encode(tok, "hello<|end|>")) for t in trajs[2:])
    assert [len(c) for c, _ in gen.calls] == [2, 2]  # turn 1: both prompts (n=2 each); turn 2: the 2 tool episodes


def test_turn_limit_and_length_budget(tok):
    prompt = _prompt(tok, "loop")
    env = AddEnvironment()
    gen = ScriptedGenerator(tok, {tuple(prompt): [CALL] * 5})
    [t] = rollout(gen, [prompt], _tool_sampling(tok, max_new_tokens=64), tokenizer=tok, environment=env, max_turns=3)
    assert (t.num_turns, t.finish_reason, len(env.calls)) == (3, "max_turns", 2)
    assert t.text.count("<tool_call>") == 3 and t.text.count("<tool_response>") == 2

    n_call = len(encode(tok, CALL))
    [t] = rollout(gen, [prompt], _tool_sampling(tok, max_new_tokens=64), tokenizer=tok, environment=AddEnvironment(),
                  max_turns=5, max_response_tokens=n_call + 3)  # the tool result does not fit
    assert t.finish_reason == "length" and t.response_ids == encode(tok, CALL) and t.num_turns == 1
    [t] = rollout(gen, [prompt], _tool_sampling(tok, max_new_tokens=64), tokenizer=tok, environment=AddEnvironment(),
                  max_turns=5, max_response_tokens=2 * n_call)  # the second call is cut mid-turn
    assert t.finish_reason == "length" and len(t.response_ids) == 2 * n_call and t.num_turns == 2

    short = ScriptedGenerator(tok, {tuple(prompt): ["a long answer without end"]})
    [t] = rollout(short, [prompt], _tool_sampling(tok, max_new_tokens=5), tokenizer=tok, environment=AddEnvironment())
    assert (t.finish_reason, len(t.response_ids)) == ("length", 5)


def test_single_turn_without_environment(tok):
    prompt = _prompt(tok, "2+3?")
    gen = ScriptedGenerator(tok, {tuple(prompt): [CALL, "never"]})
    [t] = rollout(gen, [prompt], _tool_sampling(tok, max_new_tokens=64), tokenizer=tok)
    assert (t.num_turns, t.finish_reason, t.text) == (1, "stop", CALL) and len(gen.calls) == 1
    assert t.response_mask == [1] * len(t.response_ids)


def test_rollout_rejects_bad_setup(tok):
    prompt = _prompt(tok, "x")
    gen = ScriptedGenerator(tok, {tuple(prompt): ["y<|end|>"]})
    with pytest.raises(ValueError, match="stop_token_ids"):
        rollout(gen, [prompt], SamplingParams(), tokenizer=tok, environment=AddEnvironment())
    with pytest.raises(ValueError, match="max_turns"):
        rollout(gen, [prompt], SamplingParams(), tokenizer=tok, max_turns=0)

    class BadEnv:
        def execute(self, text):
            return 5

    gen = ScriptedGenerator(tok, {tuple(prompt): [CALL]})
    with pytest.raises(TypeError, match="must return str"):
        rollout(gen, [prompt], _tool_sampling(tok), tokenizer=tok, environment=BadEnv())


def test_tool_call_text_takes_the_last_call(tok):
    ids = encode(tok, "think<tool_call>a</tool_call>more" + CALL)
    assert tool_call_text(tok, ids) == CALL[CALL.index("<tool_call>"):]
    assert tool_call_text(tok, encode(tok, "no call</tool_call>")) == "no call</tool_call>"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    spec = TinySpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
    d = materialize_tiny(spec, tmp_path_factory.mktemp("roll") / "m", seed=0)
    tok = load_tokenizer(d)
    return SimpleNamespace(tok=tok, gen=HFGenerator(d, tok, batch_size=8))


def test_real_tiny_model_multi_turn_plumbing(tiny):
    """The random model never writes `</tool_call>`, so a token it does write greedily plays
    that role: the episode then really goes tool call -> result -> continuation."""
    tok, gen = tiny.tok, tiny.gen
    prompts = [_prompt(tok, "What is 2+3?"), _prompt(tok, "hi")]
    sampling = SamplingParams(n=2, temperature=0.8, max_new_tokens=12, seed=4)
    # Per-row RNG streams do not depend on the stop ids: episode 0's first turn replays `free`.
    free = gen.generate(prompts, sampling)[0].token_ids
    stop = next(t for t in free[1:] if t != tok.eos_token_id)
    env = AddEnvironment()
    sampling = SamplingParams(n=2, temperature=0.8, max_new_tokens=12, stop_token_ids=[stop], seed=4)
    trajs = rollout(gen, prompts, sampling, tokenizer=tok, environment=env, max_turns=3)
    assert len(trajs) == 4 and env.calls
    assert trajs[0].num_turns >= 2 and trajs[0].response_ids[:free.index(stop) + 1] == free[:free.index(stop) + 1]
    for t in trajs:
        mask = torch.tensor(t.response_mask)
        ids = torch.tensor(t.prompt_ids + t.response_ids)
        with torch.no_grad():
            logits = gen.model(ids[None]).logits[0].double()  # (T, V)
        lp = torch.log_softmax(logits[:-1] / 0.8, dim=-1).gather(-1, ids[1:, None])[:, 0][len(t.prompt_ids) - 1:]
        got = torch.tensor(t.rollout_logprobs, dtype=torch.float64)
        assert torch.allclose(got[mask == 1], lp[mask == 1], atol=1e-4)
        assert (got[mask == 0] == 0).all()
        if t.num_turns >= 2:  # the injected tool result sits, masked, right after the stop token
            k = t.response_ids.index(stop)
            inj = tool_result_ids(tok, "error: no parameters")
            assert t.response_mask[k] == 1 and t.response_mask[k + 1:k + 1 + len(inj)] == [0] * len(inj)
            assert t.response_ids[k + 1:k + 1 + len(inj)] == inj and "<tool_response>" in t.text
