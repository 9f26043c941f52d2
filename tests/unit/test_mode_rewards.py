"""Per-mode GRPO reward shaping (experts/mode_rewards.py) against a float64 loop reference,
hand-worked values, and its wiring into GRPO's reward path per sample's mode."""

import random

import pytest
import torch

from engine.modes import ModeSettings, has_think_tokens
from experts.mode_rewards import compute_mode_rewards, shape_mode_rewards


def reference(rewards, lengths, think, kind, budget, penalty, think_penalty):
    out = []
    for r, n, t in zip(rewards, lengths, think):
        if kind == "non-think":
            out.append(r * (1.0 - think_penalty) if t else r)
        elif kind == "think-high" and budget is not None and n > budget:
            out.append(r - penalty * (n - budget))
        else:
            out.append(r)
    return out


@pytest.mark.parametrize("kind", ["non-think", "think-high", "think-max"])
@pytest.mark.parametrize("seed", range(5))
def test_matches_the_float64_reference(kind, seed):
    g = random.Random(seed)
    B = 33
    rewards = [g.random() for _ in range(B)]
    lengths = [g.randint(0, 200) for _ in range(B)]
    think = [g.random() < 0.5 for _ in range(B)]
    budget, penalty, tp = g.choice([None, 1, 64, 150]), g.random() * 0.02, g.random()
    got = compute_mode_rewards(torch.tensor(rewards, dtype=torch.float64), torch.tensor(lengths),
                               torch.tensor(think), kind, length_budget=budget, length_penalty=penalty,
                               think_penalty=tp)
    want = reference(rewards, lengths, think, kind, budget, penalty, tp)
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-12, rtol=0)


def test_hand_worked_values():
    r = torch.tensor([1.0, 1.0, 0.5])
    n = torch.tensor([10, 40, 50])
    t = torch.tensor([True, False, True])
    # non-think, think_penalty 1: the samples that wrote <think> get 0
    assert compute_mode_rewards(r, n, t, "non-think").tolist() == [0.0, 1.0, 0.0]
    # think-high, budget 32, 0.01 per token: 10 -> none; 40 -> 8 over -> 1 - 0.08; 50 -> 18 over -> 0.5 - 0.18
    got = compute_mode_rewards(r, n, t, "think-high", length_budget=32, length_penalty=0.01).tolist()
    assert got == pytest.approx([1.0, 0.92, 0.32])
    assert compute_mode_rewards(r, n, t, "think-max").tolist() == r.tolist()
    with pytest.raises(ValueError, match="unknown mode"):
        compute_mode_rewards(r, n, t, "think-low")


def test_each_sample_is_shaped_by_its_own_mode():
    modes = {"non-think": ModeSettings(max_new_tokens=8),
             "think-high": ModeSettings(max_new_tokens=64, length_budget=4, length_penalty=0.1)}
    texts = ["<think>x</think>\\boxed{1}", "\\boxed{1}", "<think>abc</think>\\boxed{1}", "plain"]
    got = shape_mode_rewards([1.0, 1.0, 1.0, 1.0], texts, [6, 3, 10, 10], ["non-think", "non-think", "think-high", None],
                             modes)
    assert got == pytest.approx([0.0, 1.0, 0.4, 1.0])
    assert has_think_tokens("a</think>") and has_think_tokens("<think>") and not has_think_tokens("\\boxed{2}")


def test_grpo_reward_path_shapes_per_mode():
    """experts.grpo._sample_round: a non-think sample that thinks scores 0, its twin without
    <think> keeps the verifier's 1; think-high pays for tokens past its budget."""
    from engine.generation import Completion
    from engine.prompt_stream import PromptStream
    from engine.tokenizer import build_tiny_tokenizer
    from experts.grpo import DomainSpec, _sample_round
    from experts.grpo_settings import GRPOSettings

    tok = build_tiny_tokenizer()
    eos = tok.eos_token_id
    replies = ["<think>3+4=7</think>\\boxed{7}", "\\boxed{7}"]

    class Gen:
        def generate(self, prompts, sampling):
            return [Completion(tok(replies[k % 2], add_special_tokens=False)["input_ids"] + [eos],
                               [-0.1] * (len(tok(replies[k % 2], add_special_tokens=False)["input_ids"]) + 1), "stop")
                    for k in range(len(prompts) * sampling.n)]

    class Res:
        def __init__(self, s):
            self.score, self.error, self.failure, self.info = s, None, None, {}

    class Scorer:
        def score(self, verifier, texts, refs):
            return [Res(1.0 if "\\boxed{7}" in t else 0.0) for t in texts]

    rows = [{"id": f"p@{m}", "domain": "math", "mode": m, "reference": {"answer": "7"},
             "messages": [{"role": "user", "content": "3+4"}]} for m in ("non-think", "think-high")]
    modes = {"non-think": ModeSettings(max_new_tokens=32),
             "think-high": ModeSettings(max_new_tokens=32, length_budget=5, length_penalty=0.1)}
    settings = GRPOSettings(group_size=2, prompts_per_step=2, max_new_tokens=32)
    groups = _sample_round(settings, PromptStream(rows, seed=0), {"math": DomainSpec("math", None, modes)}, 2,
                           generator=Gen(), scorer=Scorer(), tokenizer=tok, step_seed=0, rnd=0)
    by_row = {g[0].row_id: [s.reward for s in g] for g in groups}
    assert by_row["p@non-think"] == [0.0, 1.0]
    n_think = len(tok(replies[0], add_special_tokens=False)["input_ids"]) + 1  # + <|end|>
    n_direct = len(tok(replies[1], add_special_tokens=False)["input_ids"]) + 1
    assert by_row["p@think-high"] == pytest.approx([1 - 0.1 * (n_think - 5), 1 - 0.1 * max(n_direct - 5, 0)])
