"""The HF generator: sampling math against float64 references, greedy against a manual
arg-max loop, log-probs against a teacher-forced forward pass, batch invariance, seeds,
stop tokens, weight loading; and the registry."""

import math
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from engine.generation import (
    Completion, HFGenerator, SamplingParams, build_generator, compute_sampling_logprobs, register_generator,
    row_seed, split_completion,
)
from engine.model import TinySpec, load_model, load_tokenizer, materialize_tiny

torch.set_num_threads(1)
SPEC = TinySpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)


# ------------------------------------------------------------------ pure sampling math
def _reference_logprobs(logits, temperature, top_k, top_p):
    """float64, one row at a time, written the obvious way."""
    out = []
    for row in logits.double().tolist():
        if temperature == 0:
            z = row
        else:
            z = [x / temperature for x in row]
        keep = set(range(len(z)))
        if temperature > 0 and top_k:
            kth = sorted(z, reverse=True)[top_k - 1]
            keep = {i for i in keep if z[i] >= kth}
        if temperature > 0 and top_p < 1:
            zk = {i: z[i] for i in keep}
            m = max(zk.values())
            total = sum(math.exp(v - m) for v in zk.values())
            mass, kept = 0.0, set()
            for i in sorted(zk, key=lambda i: -zk[i]):
                if mass < top_p:
                    kept.add(i)
                mass += math.exp(zk[i] - m) / total
            keep = kept
        m = max(z[i] for i in keep)
        lse = m + math.log(sum(math.exp(z[i] - m) for i in keep))
        out.append([z[i] - lse if i in keep else -math.inf for i in range(len(z))])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (0, 0, 1.0), (1.3, 5, 1.0),
                                                     (0.8, 0, 0.6), (1.0, 7, 0.9)])
def test_sampling_logprobs_match_float64_reference(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 23, generator=g) * 3
    got = compute_sampling_logprobs(logits, temperature, top_k, top_p).double()
    ref = _reference_logprobs(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    finite = torch.isfinite(ref)
    assert torch.allclose(got[finite], ref[finite], atol=1e-5)


def test_sampling_logprobs_hand_worked():
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]])
    # top_p 0.6: mass before 0.3 is 0.5 < 0.6 (kept), before 0.2 is 0.8 (dropped) -> 0.625, 0.375
    lp = compute_sampling_logprobs(logits, 1.0, 0, 0.6)
    assert torch.allclose(lp[0, :2].exp(), torch.tensor([0.625, 0.375]), atol=1e-6) and lp[0, 2] == -math.inf
    # top_p 0.5: mass before 0.3 is 0.5, not < 0.5 -> only the top token, log 1 = 0
    assert torch.allclose(compute_sampling_logprobs(logits, 1.0, 0, 0.5)[0], torch.tensor([0.0, -math.inf, -math.inf]))
    # top_k 2 renormalises the same two tokens: 0.5/0.8, 0.3/0.8
    assert torch.allclose(compute_sampling_logprobs(logits, 1.0, 2, 1.0)[0, :2].exp(), torch.tensor([0.625, 0.375]))
    # temperature 0.5 squares the probabilities: 0.25, 0.09, 0.04 over 0.38
    want = torch.tensor([0.25, 0.09, 0.04]) / 0.38
    assert torch.allclose(compute_sampling_logprobs(logits, 0.5)[0].exp(), want, atol=1e-6)


@pytest.mark.parametrize("kwargs,word", [({"n": 0}, "n must"), ({"temperature": -1}, "temperature"),
                                         ({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "top_k"),
                                         ({"max_new_tokens": 0}, "max_new_tokens")])
def test_sampling_params_reject_bad_values(kwargs, word):
    with pytest.raises(ValueError, match=word):
        SamplingParams(**kwargs)


def test_split_completion_cuts_after_first_stop():
    c = split_completion([5, 6, 9, 7, 9], [-1.0, -2.0, -3.0, -4.0, -5.0], {9}, 5)
    assert c == Completion([5, 6, 9], [-1.0, -2.0, -3.0], "stop")
    assert split_completion([5, 6], [-1.0, -2.0], {9}, 2).finish_reason == "length"
    with pytest.raises(RuntimeError, match="without a stop token"):
        split_completion([5], [-1.0], {9}, 3)


def test_row_seed_deterministic_and_distinct():
    seeds = {row_seed(s, i, j) for s in range(3) for i in range(20) for j in range(4)}
    assert len(seeds) == 3 * 20 * 4 and all(0 <= x < 2**63 for x in seeds)
    assert row_seed(7, 3, 1) == row_seed(7, 3, 1)


# ------------------------------------------------------------------ the HF generator
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    a = materialize_tiny(SPEC, root / "a", seed=0)
    b = materialize_tiny(SPEC, root / "b", seed=1)
    tok = load_tokenizer(a)
    gen = HFGenerator(a, tok, batch_size=8)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("hello there", "hi", "2+2=", "abc def ghi")]
    return SimpleNamespace(a=a, b=b, tok=tok, gen=gen, prompts=prompts)


def _argmax_loop(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def _teacher_forced(model, prompt, completion, temperature):
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = model(ids).logits[0].double()  # (T, V)
    lp = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return lp[pos, torch.tensor(completion)]


def test_greedy_equals_manual_argmax_loop(tiny):
    out = tiny.gen.generate(tiny.prompts, SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=[]))
    model = tiny.gen.model
    for p, c in zip(tiny.prompts, out):
        ref = _argmax_loop(model, p, len(c.token_ids))
        assert c.token_ids == ref
        assert c.finish_reason == ("stop" if ref[-1] == tiny.tok.eos_token_id else "length")


@pytest.mark.parametrize("temperature", [0, 0.7, 1.0])
def test_logprobs_equal_teacher_forced_forward(tiny, temperature):
    out = tiny.gen.generate(tiny.prompts, SamplingParams(n=2, temperature=temperature, max_new_tokens=10, seed=3))
    assert len(out) == 2 * len(tiny.prompts)
    for k, c in enumerate(out):
        ref = _teacher_forced(tiny.gen.model, tiny.prompts[k // 2], c.token_ids, temperature)
        assert torch.allclose(torch.tensor(c.logprobs, dtype=torch.float64), ref, atol=1e-5)


def test_top_k_logprobs_are_of_the_truncated_distribution(tiny):
    out = tiny.gen.generate(tiny.prompts[:2], SamplingParams(temperature=1.0, top_k=3, max_new_tokens=8, seed=5))
    for p, c in zip(tiny.prompts, out):
        ids = torch.tensor([p + c.token_ids])
        with torch.no_grad():
            logits = tiny.gen.model(ids).logits[0, len(p) - 1:-1]  # (L, V)
        ref = compute_sampling_logprobs(logits, 1.0, 3, 1.0).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        assert torch.isfinite(ref).all()  # every sampled token lies in its step's top 3
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-5)


def test_batched_equals_unbatched(tiny):
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    together = tiny.gen.generate(tiny.prompts, greedy)
    alone = [tiny.gen.generate([p], greedy)[0] for p in tiny.prompts]
    for x, y in zip(together, alone):
        assert x.token_ids == y.token_ids
        assert max(abs(a - b) for a, b in zip(x.logprobs, y.logprobs)) < 1e-5
    sampled = SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=11)
    one_by_one = HFGenerator(tiny.gen.model, tiny.tok, batch_size=1).generate(tiny.prompts, sampled)
    wide = tiny.gen.generate(tiny.prompts, sampled)
    assert [c.token_ids for c in one_by_one] == [c.token_ids for c in wide]


def test_seed_determines_samples(tiny):
    s = SamplingParams(n=4, temperature=1.0, max_new_tokens=10, seed=21)
    first = [c.token_ids for c in tiny.gen.generate(tiny.prompts, s)]
    assert first == [c.token_ids for c in tiny.gen.generate(tiny.prompts, s)]
    other = [c.token_ids for c in tiny.gen.generate(tiny.prompts, SamplingParams(**{**s.__dict__, "seed": 22}))]
    assert other != first
    assert len({tuple(t) for t in first[:4]}) > 1  # the n samples of one prompt differ


def test_stop_token_ends_generation(tiny):
    free = tiny.gen.generate(tiny.prompts[:1], SamplingParams(temperature=0, max_new_tokens=12))[0]
    ids = free.token_ids
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])  # first fresh token from index 2 on
    stopped = tiny.gen.generate(tiny.prompts[:1], SamplingParams(temperature=0, max_new_tokens=12,
                                                                 stop_token_ids=[ids[k]]))[0]
    assert stopped.token_ids == ids[:k + 1] and stopped.finish_reason == "stop"
    assert stopped.logprobs == pytest.approx(free.logprobs[:k + 1], abs=1e-6)


def test_load_weights_changes_outputs_and_matches_saved_model(tiny):
    gen = HFGenerator(tiny.a, tiny.tok)
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    before = gen.generate(tiny.prompts, greedy)
    gen.load_weights(load_model(tiny.b).state_dict())
    after = gen.generate(tiny.prompts, greedy)
    ref = HFGenerator(tiny.b, tiny.tok).generate(tiny.prompts, greedy)
    assert [c.token_ids for c in after] == [c.token_ids for c in ref]
    assert [c.logprobs for c in after] == [c.logprobs for c in ref]
    assert [c.logprobs for c in after] != [c.logprobs for c in before]


def test_load_weights_rejects_bad_state(tiny):
    gen = HFGenerator(tiny.a, tiny.tok)
    state = load_model(tiny.b).state_dict()
    with pytest.raises(KeyError, match="unknown parameter names"):
        gen.load_weights({**state, "model.nope.weight": torch.zeros(1)})
    name = "model.norm.weight"
    with pytest.raises(ValueError, match=name):
        gen.load_weights({**state, name: torch.zeros(3)})
    with pytest.raises(KeyError, match="lacks"):
        gen.load_weights({name: state[name]})
    gen.load_weights({name: state[name]}, strict=False)
    assert torch.equal(gen.model.model.norm.weight, state[name])


def test_generate_rejects_bad_prompts(tiny):
    with pytest.raises(ValueError, match=r"prompt_ids\[1\] is empty"):
        tiny.gen.generate([[5], []], SamplingParams())
    with pytest.raises(ValueError, match=r"prompt_ids\[0\] has ids outside"):
        tiny.gen.generate([[5, 10**6]], SamplingParams())


def test_registry(tiny):
    cfg = SimpleNamespace(backend="hf", batch_size=4, gpu_memory_utilization=0.5)
    gen = build_generator(cfg, tiny.a, tokenizer=tiny.tok, device="cpu")
    assert isinstance(gen, HFGenerator) and gen.batch_size == 4
    with pytest.raises(KeyError, match=r"unknown generator backend 'nope'; known: hf, vllm"):
        build_generator(SimpleNamespace(backend="nope"), tiny.a)
    with pytest.raises(ValueError, match="already registered"):
        register_generator("hf")(lambda *a, **k: None)


def test_importing_generators_does_not_import_vllm():
    code = "import engine.generation, engine.generation_vllm, engine.rollout, sys; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------ vLLM glue that needs no vLLM
def test_weight_buckets_cover_state_in_order():
    from engine.generation_vllm import weight_buckets

    state = {f"w{i}": torch.full((i + 1, 4), float(i)) for i in range(6)}  # 16*(i+1) bytes each
    buckets = list(weight_buckets(state, max_bytes=50))
    assert [n for b in buckets for n, _ in b] == list(state)
    # greedy packing under 50 bytes: [16+32], [48], [64], [80], [96] (a lone tensor may exceed)
    assert [[n for n, _ in b] for b in buckets] == [["w0", "w1"], ["w2"], ["w3"], ["w4"], ["w5"]]
    assert all(torch.equal(t, state[n]) for b in buckets for n, t in b)


def test_vllm_output_mapping():
    from engine.generation_vllm import WeightSyncExtension, _completion, pack_tensors, unpack_tensors

    lp = lambda v: SimpleNamespace(logprob=v)  # noqa: E731
    out = SimpleNamespace(token_ids=[4, 9], logprobs=[{4: lp(-0.5)}, {9: lp(-1.5), 3: lp(-0.1)}], finish_reason="stop")
    assert _completion(out, {9}) == Completion([4, 9], [-0.5, -1.5], "stop")
    with pytest.raises(RuntimeError, match="without a stop token"):
        _completion(out, {7})
    with pytest.raises(RuntimeError, match="abort"):
        _completion(SimpleNamespace(**{**out.__dict__, "finish_reason": "abort"}), {9})
    with pytest.raises(RuntimeError, match="1 log-prob entries for 2 tokens"):
        _completion(SimpleNamespace(**{**out.__dict__, "logprobs": out.logprobs[:1]}), {9})

    got = []

    class Worker(WeightSyncExtension):  # vLLM 0.32's in-place reload, as the extension calls it
        def reload_weights(self, weights_iterator=None, is_checkpoint_format=True):
            got.extend(weights_iterator)

    worker = Worker()
    assert "reload_weights" in worker.polymath_check_weight_sync()
    assert worker.polymath_stage_weights(pack_tensors([("a", torch.ones(2))])) == 1
    assert worker.polymath_stage_weights(pack_tensors([("b", torch.zeros(3))])) == 2
    assert worker.polymath_commit_weights() == 2 and [n for n, _ in got] == ["a", "b"]
    assert worker.polymath_commit_weights() == 0  # staging was cleared
    named = [("f", torch.randn(3, 2)), ("b", torch.randn(4).to(torch.bfloat16)), ("s", torch.tensor(2.5))]
    back = unpack_tensors(pack_tensors(named))
    assert all(n == m and t.dtype == u.dtype and torch.equal(t, u) for (n, t), (m, u) in zip(named, back))


def test_weight_sync_signature_checks_reject_another_vllm_s_reload_weights():
    """`reload_weights` changed arguments across vLLM releases (one took none and re-read
    the checkpoint from disk): the start-up check names what is missing and the supported
    range. (tests/integration/test_vllm.py checks the installed vLLM's real worker.)"""
    from engine.generation_vllm import COLLECTIVE_RPC_PARAMS, WeightSyncExtension, check_signature, pack_tensors
    from engine.vllm_support import SUPPORTED_VLLM

    class OldWorker(WeightSyncExtension):
        def reload_weights(self):  # the no-argument form
            pass

    class CatchAllRunner:
        def reload_weights(self, **kwargs):  # would swallow the arguments silently
            pass

    class PassThroughWorker(WeightSyncExtension):  # vLLM 0.32's shape: the worker forwards to its runner
        def __init__(self, runner):
            self.model_runner = runner

        def reload_weights(self, *args, **kwargs):
            self.model_runner.reload_weights(*args, **kwargs)

    for worker in (OldWorker(), PassThroughWorker(CatchAllRunner())):
        with pytest.raises(RuntimeError, match=r"lacks the arguments \['weights_iterator', 'is_checkpoint_format'\]"):
            worker.polymath_check_weight_sync()
    with pytest.raises(RuntimeError, match="passes \\*args, \\*\\*kwargs through but the worker has no model_runner"):
        PassThroughWorker(None).polymath_check_weight_sync()
    with pytest.raises(RuntimeError, match="does not exist in this vLLM"):
        WeightSyncExtension().polymath_check_weight_sync()

    got = []

    class Runner:  # vLLM 0.32's GPUModelRunner.reload_weights (the CPU runner inherits it)
        def reload_weights(self, weights_iterator=None, weights_path=None, is_checkpoint_format=True):
            got.extend(weights_iterator)

    worker = PassThroughWorker(Runner())
    assert "Runner.reload_weights (via PassThroughWorker.reload_weights)" in worker.polymath_check_weight_sync()
    worker.polymath_stage_weights(pack_tensors([("a", torch.ones(2))]))
    assert worker.polymath_commit_weights() == 1 and [n for n, _ in got] == ["a"]

    def collective_rpc(method, timeout=None, args=(), kwargs=None):
        pass

    assert check_signature(collective_rpc, COLLECTIVE_RPC_PARAMS, "LLM.collective_rpc").startswith("LLM.collective_rpc(")
    with pytest.raises(RuntimeError, match=r"LLM.collective_rpc\(method\) lacks the arguments \['args'\]"):
        check_signature(lambda method: None, COLLECTIVE_RPC_PARAMS, "LLM.collective_rpc")


def test_inverse_cdf_sampling_matches_the_distribution_and_skips_filtered_tokens():
    from engine.generation import sample_inverse_cdf

    p = torch.tensor([[0.1, 0.0, 0.6, 0.3]], dtype=torch.float64)
    logp = p.log()  # the 0 becomes -inf, as top-k/top-p filtering leaves it
    # hand-worked: CDF 0.1, 0.1, 0.7, 1.0
    for u, want in ((1e-12, 0), (0.0999, 0), (0.1001, 2), (0.6999, 2), (0.7001, 3), (1.0, 3)):
        assert int(sample_inverse_cdf(logp, torch.tensor([u]))[0]) == want, u
    g = torch.Generator().manual_seed(0)
    n = 200_000
    u = 1.0 - torch.rand(n, dtype=torch.float64, generator=g)
    draws = sample_inverse_cdf(logp.expand(n, 4), u)
    freq = torch.bincount(draws, minlength=4).double() / n
    assert freq[1] == 0
    assert torch.allclose(freq, p[0], atol=4 * (0.25 / n) ** 0.5)  # 4 sigma of a binomial frequency
