"""Rewards score the answer, not the reasoning (engine.reasoning): the split itself, then
rows where scoring the whole completion and scoring the answer disagree (a right draft in
the reasoning and a wrong final answer, a cut-off reasoning whose last number is right,
IFEval constraints broken only in the reasoning), through the real verifiers and the GRPO
driver, the OPD reward term, eval, the `rewards score` CLI and tool rollouts."""

import json
import sys
from pathlib import Path

import pytest

from engine.domain_spec import DomainSpec
from engine.generation import Completion
from engine.reasoning import UNFINISHED, ReasoningMarkers, prompt_opens_reasoning, split_reasoning
from engine.tokenizer import build_tiny_tokenizer
from rewards.registry import get_verifier

sys.path.insert(0, str(Path(__file__).parents[1] / "fixtures" / "templates"))
from families import FAMILIES, build_family_tokenizer  # noqa: E402

MATH = {"answer": "7"}
NO_COMMA = {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
# (completion, reference, verifier, score of the whole text, score of the answer)
DISAGREE = [
    ("<think>3+4 is \\boxed{7}</think>The answer is 8", MATH, "math", 1.0, 0.0),  # right draft, wrong answer
    ("<think>3+4 makes 7", MATH, "math", 1.0, 0.0),  # cut off in the reasoning; its last number is right
    ("<think>first, then, a comma</think>the sea is calm and wide", NO_COMMA, "ifeval", 0.0, 1.0),
    ("<think>so 3+4</think>\\boxed{7}", MATH, "math", 1.0, 1.0),  # the two agree
]


def test_split_hand_cases():
    assert split_reasoning("plain 7") == split_reasoning("plain 7", opened=False)
    s = split_reasoning(" plain 7\n")
    assert (s.reasoning, s.answer, s.unfinished) == ("", " plain 7\n", False)  # no reasoning: unchanged
    s = split_reasoning("<think>a\n</think>\n\nb")
    assert (s.reasoning, s.answer, s.unfinished) == ("a\n", "b", False)
    s = split_reasoning("<think>a 7")
    assert (s.reasoning, s.answer, s.unfinished) == ("a 7", "", True)
    s = split_reasoning("a</think>b")  # the prompt opened the block (DeepSeek-R1)
    assert (s.reasoning, s.answer, s.unfinished) == ("a", "b", False)
    assert split_reasoning("a 7", opened=True).unfinished and split_reasoning("a</think>b", opened=True).answer == "b"
    s = split_reasoning("x<think>r1</think>y<think>r2</think>z")  # one block per tool turn
    assert (s.reasoning, s.answer) == ("r1r2", "xyz")
    s = split_reasoning("[R]why[/R]42", markers=ReasoningMarkers("[R]", "[/R]"))
    assert (s.reasoning, s.answer) == ("why", "42")
    with pytest.raises(ValueError, match="markers"):
        ReasoningMarkers("<t>", "<t>")
    assert prompt_opens_reasoning("<｜Assistant｜><think>\n") and not prompt_opens_reasoning("<think>\n\n</think>\n\n")


class LocalScorer:
    """The real verifiers, in process (rewards.get_verifier)."""

    def __init__(self):
        self.seen = []

    def score(self, verifier, texts, refs):
        self.seen += list(texts)
        return [get_verifier(verifier)(t, r) for t, r in zip(texts, refs)]


@pytest.mark.parametrize("text,ref,verifier,whole,answer", DISAGREE)
def test_verifiers_read_the_answer(text, ref, verifier, whole, answer):
    from engine.episode import verified_results

    assert get_verifier(verifier)(text, ref).score == whole  # the disagreement is real
    got = verified_results(LocalScorer(), verifier, [text], [ref], "test")[0]
    assert got.score == answer
    if split_reasoning(text).unfinished:
        assert got.info == {"reason": UNFINISHED}


class ScriptedGenerator:
    """Each prompt's n samples are its scripted texts, in order; a text ending in the
    tokenizer's EOS stops, else it is cut off ("length")."""

    def __init__(self, tok, scripts: dict[tuple, list[str]]):
        self.tok, self.scripts = tok, scripts

    def generate(self, prompts, sampling):
        out = []
        for p in prompts:
            for text in self.scripts[tuple(p)][:sampling.n]:
                ids = self.tok(text, add_special_tokens=False)["input_ids"]
                stop = ids[-1] in {self.tok.eos_token_id, *sampling.stop_token_ids}
                out.append(Completion(ids, [-0.5] * len(ids), "stop" if stop else "length"))
        return out


def _rows_and_generator(tok, texts_by_row: list[tuple[str, dict, list[str]]], eos=None):
    from engine.chat import render_row_prompt

    eos = eos if eos is not None else tok.eos_token
    rows, scripts = [], {}
    for k, (question, ref, texts) in enumerate(texts_by_row):
        row = {"id": f"r{k}", "domain": "d", "reference": ref, "messages": [{"role": "user", "content": question}]}
        rows.append(row)
        # a text ending in "!cut" is cut off (no end of turn); the others end their turn
        scripts[tuple(render_row_prompt(row, tok))] = [t[:-4] if t.endswith("!cut") else t + eos for t in texts]
    return rows, ScriptedGenerator(tok, scripts)


# per row: the group's texts, and the rewards they should get (answer only)
MATH_GROUP = ["<think>3+4 is \\boxed{7}</think>The answer is 8", "<think>3+4 makes 7!cut",
              "<think>so 3+4</think>\\boxed{7}", "\\boxed{7}"]
MATH_WANT = [0.0, 0.0, 1.0, 1.0]


def test_grpo_driver_scores_answers_and_logs_unfinished_reasoning():
    from engine.prompt_stream import PromptStream
    from experts.grpo import collect_step
    from experts.grpo_settings import GRPOSettings

    tok = build_tiny_tokenizer()
    rows, gen = _rows_and_generator(tok, [("3+4?", MATH, MATH_GROUP)])
    settings = GRPOSettings(group_size=4, prompts_per_step=1, max_new_tokens=64, dynamic_sampling=False)
    groups, stats = collect_step(settings, PromptStream(rows, seed=0), {"d": DomainSpec("math")}, generator=gen,
                                 scorer=LocalScorer(), tokenizer=tok, step=0)
    assert [s.reward for s in groups[0]] == MATH_WANT
    assert [s.finish_reason for s in groups[0]] == ["stop", "length", "stop", "stop"]
    assert stats["unfinished_reasoning_frac"] == 0.25


def test_grpo_ifeval_constraint_broken_only_in_reasoning():
    from engine.prompt_stream import PromptStream
    from experts.grpo import collect_step
    from experts.grpo_settings import GRPOSettings

    tok = build_tiny_tokenizer()
    texts = ["<think>first, then, a comma</think>the sea is calm and wide", "the sea, calm"]
    rows, gen = _rows_and_generator(tok, [("Describe the sea without commas.", NO_COMMA, texts)])
    settings = GRPOSettings(group_size=2, prompts_per_step=1, max_new_tokens=96, dynamic_sampling=False)
    groups, _ = collect_step(settings, PromptStream(rows, seed=0), {"d": DomainSpec("ifeval")}, generator=gen,
                             scorer=LocalScorer(), tokenizer=tok, step=0)
    assert [s.reward for s in groups[0]] == [1.0, 0.0]


def test_opd_reward_term_scores_answers():
    from engine.episode import roll_out
    from pipeline.stage_opd import _rollout_scores

    tok = build_tiny_tokenizer()
    rows, gen = _rows_and_generator(tok, [("3+4?", MATH, MATH_GROUP)])
    samples = roll_out(rows, "d", DomainSpec("math"), generator=gen, tokenizer=tok, n=4, temperature=1.0,
                       max_new_tokens=64, max_turns=1)
    assert _rollout_scores(LocalScorer(), {"d": DomainSpec("math")}, samples) == MATH_WANT


def test_eval_scores_answers_and_reports_unfinished_reasoning():
    from engine.episode import roll_out
    from pipeline.evaluate import EvalSet, EvalSettings, evaluate_model
    from pipeline.stage_workers import checked_scores

    tok = build_tiny_tokenizer()
    rows, gen = _rows_and_generator(tok, [(f"q{k}?", MATH, [t]) for k, t in enumerate(MATH_GROUP)])

    def policy(es, rows_, temperature, n):  # eval_policy's rollout, on a scripted generator
        samples = roll_out(rows_, es.domain, DomainSpec(es.verifier), generator=gen, tokenizer=tok, n=n,
                           temperature=temperature, max_new_tokens=64, max_turns=1)
        return [s.scored_text for s in samples], [s.num_model_tokens for s in samples]

    entry = evaluate_model(policy, [EvalSet("d", "math", rows)], checked_scores(LocalScorer(), "eval"),
                           EvalSettings(samples=0), log=lambda _: None)
    assert entry["greedy_per_prompt"]["d"] == MATH_WANT and entry["greedy"]["d"] == 0.5
    assert entry["unfinished_reasoning"]["d"] == 0.25


def test_prompt_that_opens_reasoning_deepseek_r1():
    """DeepSeek-R1's generation prompt ends in `<think>\\n`: a completion that never writes
    `</think>` is unfinished, whatever its last number; one that closes is scored after it."""
    from engine.episode import roll_out, score_samples

    tok = build_family_tokenizer(FAMILIES["deepseek_r1"])
    texts = ["3+4 is \\boxed{7}</think>\\boxed{8}", "3+4 makes 7!cut", "3+4</think>\\boxed{7}"]
    rows, gen = _rows_and_generator(tok, [("3+4?", MATH, texts)])
    samples = roll_out(rows, "d", DomainSpec("math"), generator=gen, tokenizer=tok, n=3, temperature=1.0,
                       max_new_tokens=64, max_turns=1)
    assert all(s.reasoning_opened for s in samples)
    assert samples[1].finish_reason == "length"
    assert score_samples(LocalScorer(), DomainSpec("math"), samples, "test") == [0.0, 0.0, 1.0]


def test_tool_call_inside_reasoning_is_not_executed():
    from engine.chat import render_row_prompt, tool_call_end_id, tool_result_ids
    from engine.generation import SamplingParams
    from engine.rollout import rollout

    tok = build_tiny_tokenizer()
    calls = []

    class Env:
        def execute(self, text):
            calls.append(text)
            return "sunny"

    call = '<tool_call><invoke name="w"><parameter name="c">x</parameter></invoke></tool_call>'
    rows, gen = _rows_and_generator(tok, [("weather?", {}, ["<think>maybe " + call + "!cut"]),
                                          ("weather now?", {}, ["<think>ok</think>" + call + "!cut"])])
    prompts = [render_row_prompt(r, tok) for r in rows]
    first = gen.scripts[tuple(prompts[1])][0]  # the second row answers after its tool result
    gen.scripts[tuple(prompts[1] + tok(first, add_special_tokens=False)["input_ids"]
                      + tool_result_ids(tok, "sunny"))] = ["It is sunny." + tok.eos_token]
    sampling = SamplingParams(n=1, temperature=1.0, max_new_tokens=96, stop_token_ids=[tool_call_end_id(tok)])
    trajs = rollout(gen, prompts, sampling, tokenizer=tok, environment=Env(), max_turns=2)
    assert [t.num_turns for t in trajs] == [1, 2] and [t.finish_reason for t in trajs] == ["stop", "stop"]
    assert calls == [call]  # only the call written after the reasoning ran
    assert split_reasoning(trajs[0].text).unfinished
def test_rewards_cli_answer_only(tmp_path):
    from rewards.__main__ import main

    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"completion": t, "reference": r}) + "\n" for t, r, v, *_ in DISAGREE
                           if v == "math"))
    main(["score", "math", str(inp), "-o", str(tmp_path / "whole.jsonl"), "--workers", "1"])
    main(["score", "math", str(inp), "-o", str(tmp_path / "answer.jsonl"), "--workers", "1", "--answer-only"])
    whole = [json.loads(x) for x in (tmp_path / "whole.jsonl").read_text().splitlines()]
    answer = [json.loads(x) for x in (tmp_path / "answer.jsonl").read_text().splitlines()]
    assert [r["score"] for r in whole] == [1.0, 1.0, 1.0]
    assert [r["score"] for r in answer] == [0.0, 0.0, 1.0] and answer[1]["info"] == {"reason": UNFINISHED}


def test_opened_is_judged_on_the_generation_prompt_alone():
    """A system text that mentions `<think>` does not open the reasoning; DeepSeek-R1's
    generation prompt does; Qwen3's non-think prompt closes its block."""
    from engine.chat import row_prompt_opens_reasoning

    mention = {"messages": [{"role": "system", "content": "Start your reply with <think>"},
                            {"role": "user", "content": "3+4?"}]}
    plain = build_tiny_tokenizer()
    assert not row_prompt_opens_reasoning(mention, plain)
    assert row_prompt_opens_reasoning(mention, build_family_tokenizer(FAMILIES["deepseek_r1"]))
    qwen = build_family_tokenizer(FAMILIES["qwen3"])
    assert not row_prompt_opens_reasoning({**mention, "mode": "non-think"}, qwen)
    assert not row_prompt_opens_reasoning({**mention, "mode": "think-high"}, qwen)
