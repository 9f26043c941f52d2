"""Synthetic domains: registry, determinism, held-out splits, demonstrations under the real
verifiers, sequence lengths, and the tool environment."""

import random

import pytest

from engine.chat import render
from engine.data import row_problem
from engine.domains import Domain, get_domain, known_domains, register_domain, sample_rows, split_of
from engine.domains import code as code_domain
from engine.domains import ifeval as ifeval_domain
from engine.domains import math as math_domain
from engine.domains import tool as tool_domain
from engine.tokenizer import build_tiny_tokenizer
from rewards import get_verifier, score_batch

DOMAINS = ("code", "ifeval", "math", "tool")
# Longest rendered conversation allowed per domain (tokens): docs/DESIGN.md section 7 sizing.
MAX_TOKENS = {"math": 40, "code": 70, "ifeval": 100, "tool": 100}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def prompt_key(row):
    return row["messages"][0]["content"]


def episode_text(row):
    """What the verifier reads for a demonstration: the assistant side of the conversation."""
    parts = []
    for m in row["messages"]:
        if m["role"] == "assistant":
            parts.append(m["content"])
        elif m["role"] == "tool":
            parts.append(f"<tool_response>{m['content']}</tool_response>")
    return "".join(parts)


def test_registry_lists_and_rejects():
    assert set(DOMAINS) <= set(known_domains())
    with pytest.raises(KeyError, match="unknown domain .*; known: code, ifeval, math, math_chain, tool"):
        get_domain("chess")
    with pytest.raises(ValueError, match="already registered"):
        register_domain(Domain(name="math", verifier="math", draw=math_domain.draw))
    assert get_domain("tool").environment() is not None
    assert all(get_domain(d).environment() is None for d in ("math", "code", "ifeval"))


@pytest.mark.parametrize("name", DOMAINS)
def test_deterministic_valid_and_held_out(name, tokenizer):
    dom = get_domain(name)
    train, evals = dom.generate("train", 600, seed=3), dom.generate("eval", 60, seed=3)
    assert train == dom.generate("train", 600, seed=3)
    assert train != dom.generate("train", 600, seed=4)
    assert not {prompt_key(r) for r in train} & {prompt_key(r) for r in evals}
    # the split is a property of the problem, not of the seed
    assert not {prompt_key(r) for r in dom.generate("train", 600, seed=9)} & {prompt_key(r) for r in evals}
    assert len({prompt_key(r) for r in evals}) == len(evals)
    assert len({r["id"] for r in train + evals}) == len(train) + len(evals)
    for r in train + evals:
        assert row_problem(r) is None, r
        assert r["domain"] == name
        assert len(render(r["messages"], tokenizer).input_ids) <= MAX_TOKENS[name]


def test_generate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        get_domain("math").generate("test", 3, seed=0)
    with pytest.raises(ValueError, match="non-negative int"):
        get_domain("math").generate("train", -1, seed=0)


def test_split_of_fraction_and_small_space():
    keys = [f"k{i}" for i in range(4000)]
    frac = sum(split_of(k, 0.2) == "eval" for k in keys) / len(keys)
    assert 0.17 < frac < 0.23
    assert split_of("k1", 0.0) == "train" and split_of("k1", 1.0) == "eval"

    def tiny_space(rng, split):
        return f"q{rng.randint(0, 2)}", {"messages": [{"role": "user", "content": "q"}], "reference": {}}

    with pytest.raises(ValueError, match="problem space is too small"):
        sample_rows("tiny", "eval", 10, 0, tiny_space, eval_fraction=1.0)


@pytest.mark.parametrize("name", ("math", "ifeval", "tool"))
def test_eval_demonstrations_score_one(name):
    dom = get_domain(name)
    verifier = get_verifier(dom.verifier)
    rows = dom.generate("eval", 40, seed=0)
    scores = [verifier(episode_text(r), r["reference"]).score for r in rows]
    assert scores == [1.0] * len(rows)


def test_code_demonstrations_under_sandbox():
    rows = get_domain("code").generate("eval", 4, seed=0)
    wrong = {"messages": [{"role": "user", "content": "f(x): add 3, multiply by 2"}],
             "reference": {"tests": [f"assert f({x}) == {(x + 3) * 2}" for x in code_domain.TEST_INPUTS]}}
    texts = [episode_text(r) for r in rows] + ["def f(x): return x+3*2"]
    results = score_batch("code", texts, [r["reference"] for r in rows] + [wrong["reference"]], num_workers=2, timeout_s=20)
    assert [r.score for r in results[:-1]] == [1.0] * len(rows)
    # x+3*2 == (x+3)*2 only where x+6 == 2x+6, i.e. x = 0: one test of five
    assert results[-1].score == pytest.approx(0.2)


def test_code_expression_precedence():
    assert code_domain.expression([("add", 3), ("multiply by", 2)]) == "(x+3)*2"
    assert code_domain.expression([("multiply by", 2), ("add", 3)]) == "x*2+3"
    assert code_domain.expression([("subtract", 4), ("mod", 3)]) == "(x-4)%3"
    assert code_domain.expression([("mod", 5), ("multiply by", 3)]) == "x%5*3"
    steps = [(w, k) for w in code_domain.STEPS for k in code_domain.CONSTANTS]
    for s1 in steps:
        for s2 in steps[::5]:
            fn = eval(f"lambda x: {code_domain.expression([s1, s2])}")
            assert all(fn(x) == code_domain.compute_expected([s1, s2], x) for x in range(-6, 7)), (s1, s2)


def test_code_folded_constants():
    # add 3, multiply by 2: (x+3)*2 = x*2+6; add 4, subtract 9: x-5; multiply 4 then 6: x*24
    assert code_domain.folded([("add", 3), ("multiply by", 2)]) == "x*2+6"
    assert code_domain.folded([("subtract", 3), ("multiply by", 2)]) == "x*2-6"
    assert code_domain.folded([("add", 4), ("subtract", 9)]) == "x-5"
    assert code_domain.folded([("add", 4), ("subtract", 4)]) == "x"
    assert code_domain.folded([("multiply by", 4), ("multiply by", 6)]) == "x*24"
    assert code_domain.folded([("multiply by", 4), ("add", 6)]) is None
    assert code_domain.folded([("mod", 4), ("add", 6)]) is None
    steps = [(w, k) for w in code_domain.STEPS for k in code_domain.CONSTANTS]
    pairs = [(s1, s2) for s1 in steps for s2 in steps if code_domain.folded([s1, s2])]
    assert len(pairs) == 7 * 64  # (+-,+-) 4, (*,*) 1, (+-,*) 2 of 16 operator pairs
    for s1, s2 in pairs:
        fn = eval(f"lambda x: {code_domain.folded([s1, s2])}")
        assert all(fn(x) == code_domain.compute_expected([s1, s2], x) for x in range(-6, 7)), (s1, s2)
    rows = get_domain("code").generate("train", 1500, seed=0)
    literal = [r for r in rows if r["messages"][1]["content"] == f"def f(x): return {code_domain.expression(parse(r))}"]
    foldable = [r for r in rows if code_domain.folded(parse(r))]
    folded_share = 1 - sum(code_domain.folded(parse(r)) is not None for r in literal) / len(foldable)
    assert abs(folded_share - code_domain.FOLD_RATE) < 0.06
    evals = get_domain("code").generate("eval", 60, seed=0)
    assert all(r["messages"][1]["content"] == f"def f(x): return {code_domain.expression(parse(r))}" for r in evals)


def parse(row):
    """The steps of a code prompt `f(x): add 3, multiply by 2`."""
    text = row["messages"][0]["content"].removeprefix("f(x): ")
    return [(part.rsplit(" ", 1)[0], int(part.rsplit(" ", 1)[1])) for part in text.split(", ")]


def test_math_scratchpad_and_direct_demonstrations():
    # 7*5=35, 35-3=32
    assert math_domain.solution(7, "*", 5, "-", 3) == ("7*5=35 35-3=32 \\boxed{32}", 32)
    assert math_domain.solution(7, "*", 5, "-", 3, scratchpad=False) == ("\\boxed{32}", 32)
    rows = get_domain("math").generate("train", 2000, seed=0)
    direct = sum(r["messages"][1]["content"].startswith("\\boxed") for r in rows) / len(rows)
    assert abs(direct - math_domain.DIRECT_RATE) < 0.04
    evals = get_domain("math").generate("eval", 50, seed=0)
    assert all(not r["messages"][1]["content"].startswith("\\boxed") for r in evals)
    verifier = get_verifier("math")
    assert all(verifier(r["messages"][1]["content"], r["reference"]).score == 1.0 for r in rows[:200])


def test_ifeval_every_constraint_pair_is_followed():
    verifier = get_verifier("ifeval")
    rng = random.Random(0)
    kinds = sorted(ifeval_domain.KINDS)
    for a in kinds:
        for b in kinds:
            pair = [a] if a == b else [a, b]
            if any(set(pair) >= c for c in ifeval_domain.CONFLICTS):
                continue
            for _ in range(3):
                built = [(k, ifeval_domain.make_constraint(k, rng)) for k in pair]
                text = ifeval_domain.respond("owl", [(k, kw) for k, (_, kw) in built])
                ref = {"instruction_id_list": [ifeval_domain.KINDS[k] for k in pair], "kwargs": [kw for _, (_, kw) in built]}
                assert verifier(text, ref).score == 1.0, (pair, text, ref)
    # the unconstrained answer breaks every case/comma/quote constraint
    plain = ifeval_domain.respond("owl", [])
    assert plain == "The owl is wise, calm." and "," in plain and not plain.islower() and not plain.isupper()


def test_imperfect_train_demonstrations_fraction():
    ifv, tv = get_verifier("ifeval"), get_verifier("tool")
    rows = get_domain("ifeval").generate("train", 600, seed=0)
    imperfect = sum(ifv(episode_text(r), r["reference"]).score < 1.0 for r in rows) / len(rows)
    assert abs(imperfect - ifeval_domain.WRONG_RATE) < 0.06
    rows = get_domain("tool").generate("train", 800, seed=0)
    called = [r for r in rows if any(m["role"] == "tool" for m in r["messages"])]
    scores = [tv(episode_text(r), r["reference"]).score for r in called]
    assert set(scores) <= {0.5, 1.0}  # a call made is always right; only weather answers are swapped
    weather = sum(r["reference"]["calls"][0]["name"] == "get_weather" for r in called)
    assert abs(scores.count(0.5) / weather - tool_domain.WRONG_RATE) < 0.06
    # sunrise questions answered from memory (no call): the right time, half the reward
    sunrise = [r for r in rows if r["reference"]["calls"][0]["name"] == "get_time"]
    direct = [r for r in sunrise if r not in called]
    assert abs(len(direct) / len(sunrise) - tool_domain.DIRECT_RATE) < 0.06
    assert {tv(episode_text(r), r["reference"]).score for r in direct} == {0.5}
    assert all(r in called for r in rows if r["reference"]["calls"][0]["name"] != "get_time")
    held_out = get_domain("tool").generate("eval", 200, seed=0)  # eval references always make the call
    assert all(any(m["role"] == "tool" for m in r["messages"]) for r in held_out)


def test_tool_environment_executes_and_reports_errors():
    env = tool_domain.ToolEnvironment()
    call = tool_domain.call_text("get_weather", {"city": "Paris", "day": 3})
    assert env.execute(call) == tool_domain.get_weather("Paris", 3)
    assert env.execute("some text " + tool_domain.call_text("add", {"a": 2, "b": 40})) == "42"
    both = call[: -len("</tool_call>")] + '<invoke name="add"><parameter name="a">1</parameter><parameter name="b">2</parameter></invoke></tool_call>'
    assert env.execute(both) == tool_domain.get_weather("Paris", 3) + "\n3"
    assert env.execute("<tool_call><invoke name=\"add\">").startswith("error: malformed tool call")
    assert env.execute("no call here") == "error: no tool call found"
    unknown = env.execute(tool_domain.call_text("fly", {"to": "Mars"}))
    assert unknown.startswith("error: unknown tool 'fly'") and "get_weather" in unknown
    assert "missing required argument 'day'" in env.execute(tool_domain.call_text("get_time", {"city": "Oslo"}))
    assert "expected integer" in env.execute(tool_domain.call_text("add", {"a": "two", "b": 1}))
    many = "<tool_call>" + '<invoke name="add"><parameter name="a">1</parameter><parameter name="b">1</parameter></invoke>' * 5 + "</tool_call>"
    assert env.execute(many).startswith("error: 5 calls")
    schema = tool_domain._schema("shout", "long output", {"text": "string"})
    loud = tool_domain.ToolEnvironment({"shout": (schema, lambda text: text * 1000)}, max_output_chars=50)
    out = loud.execute(tool_domain.call_text("shout", {"text": "a"}))
    assert len(out) == 50 and out.endswith("...")
    broken = tool_domain.ToolEnvironment({"shout": (schema, lambda text: 1 / 0)})
    assert broken.execute(tool_domain.call_text("shout", {"text": "a"})).startswith("error: shout failed: ZeroDivisionError")


def test_tool_values_are_deterministic_and_vary():
    assert tool_domain.get_weather("Oslo", 1) == tool_domain.get_weather("Oslo", 1)
    assert len({tool_domain.get_weather("Oslo", d) for d in range(1, 31)}) > 20
    t = tool_domain.get_time("Oslo", 2)
    assert len(t) == 5 and t[2] == ":" and 0 <= int(t[:2]) < 24 and 0 <= int(t[3:]) < 60
