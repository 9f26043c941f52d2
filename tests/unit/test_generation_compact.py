"""The HF generator's compacting decode loop (`HFGenerator(compact=True)`, the default) against
transformers' own `generate` (`compact=False`) on random tiny models of every family the
project loads, plus Mistral and Gemma 3 (sliding-window layers): the same tokens, log-probs,
finish reasons, with rows that stop at very different lengths, greedy and sampled, top-k/top-p;
finished rows really leave the batch; the output does not depend on the batch size."""

import pathlib

import pytest
import torch
import transformers

from engine.generation import HFGenerator, SamplingParams, supports_compact_decode

torch.set_num_threads(1)
V = 64  # a small vocabulary: a random model's tokens are near-uniform, so stop ids come up often
KW = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          intermediate_size=64, pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)


def _model(family: str):
    torch.manual_seed(0)
    cfg = {
        "qwen2": lambda: transformers.Qwen2Config(**KW),
        "llama": lambda: transformers.LlamaConfig(**KW),
        "llama_mha": lambda: transformers.LlamaConfig(**{**KW, "num_key_value_heads": 4}),  # no GQA: keys as views
        "qwen3": lambda: transformers.Qwen3Config(head_dim=8, **KW),
        "mistral": lambda: transformers.MistralConfig(sliding_window=None, **KW),
        # layer 0 slides over 6 tokens, layer 1 is full: the cache mixes both layer kinds
        "gemma3": lambda: transformers.Gemma3TextConfig(head_dim=8, sliding_window=6, query_pre_attn_scalar=8,
                                                        layer_types=["sliding_attention", "full_attention"], **KW),
    }[family]()
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # larger logits than the default init: samples differ from row to row
        model.get_output_embeddings().weight.mul_(40.0)
    return model.eval()


def _prompts(k: int = 9):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(2, V, (int(torch.randint(2, 13, (), generator=g)),), generator=g).tolist() for _ in range(k)]


def _batch_sizes(model):
    """Record the batch size of every forward call."""
    sizes = []
    model.get_input_embeddings().register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    return sizes


def _assert_same(got, ref, atol=1e-5):
    assert [c.token_ids for c in got] == [c.token_ids for c in ref]
    assert [c.finish_reason for c in got] == [c.finish_reason for c in ref]
    for a, b in zip(got, ref):
        assert len(a.logprobs) == len(a.token_ids)
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=atol, rtol=0)


def _spread(out, max_new):
    """The rows stop at very different lengths, and some run to the limit."""
    lengths = [len(c.token_ids) for c in out]
    assert min(lengths) <= max_new // 4 and any(c.finish_reason == "length" for c in out), lengths
    assert any(c.finish_reason == "stop" for c in out)


FAMILIES = ["qwen2", "llama", "llama_mha", "qwen3", "mistral", "gemma3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_equals_generate(family):
    model = _model(family)
    assert supports_compact_decode(model)
    prompts = _prompts()
    s = SamplingParams(n=3, temperature=1.0, max_new_tokens=32, stop_token_ids=[5, 6], seed=7)
    ref = HFGenerator(model, None, batch_size=64, compact=False).generate(prompts, s)
    _spread(ref, 32)
    sizes = _batch_sizes(model)
    # compact at every stop, down to one row: the most reshuffling the loop can do
    got = HFGenerator(model, None, batch_size=64, compact_fraction=0.0, compact_min_rows=1).generate(prompts, s)
    _assert_same(got, ref)
    # the forward computing token k (k >= 1) holds exactly the rows still running: length > k
    lengths = [len(c.token_ids) for c in ref]
    assert sizes == [len(ref)] + [sum(n > k for n in lengths) for k in range(1, max(lengths))]


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_greedy_equals_generate(family):
    model = _model(family)
    prompts = _prompts()
    free = HFGenerator(model, None, compact=False).generate(prompts, SamplingParams(temperature=0, max_new_tokens=24))
    # stop ids from different rows at different depths: the rows stop at different lengths
    stops = sorted({free[0].token_ids[1], free[3].token_ids[9], free[6].token_ids[16]} - {1})
    s = SamplingParams(temperature=0, max_new_tokens=24, stop_token_ids=stops)
    ref = HFGenerator(model, None, compact=False).generate(prompts, s)
    assert len({len(c.token_ids) for c in ref}) >= 2
    got = HFGenerator(model, None, compact_fraction=0.0, compact_min_rows=1).generate(prompts, s)
    _assert_same(got, ref)


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.8), (7, 0.9)])
def test_top_k_top_p_equal_generate(top_k, top_p):
    model = _model("llama")
    prompts = _prompts()
    s = SamplingParams(n=2, temperature=0.9, top_k=top_k, top_p=top_p, max_new_tokens=20, stop_token_ids=[5, 6, 7],
                       seed=3)
    ref = HFGenerator(model, None, compact=False).generate(prompts, s)
    got = HFGenerator(model, None, compact_fraction=0.0, compact_min_rows=1).generate(prompts, s)
    _assert_same(got, ref)


@pytest.mark.parametrize("family", ["qwen3", "llama_mha"])
def test_uncompacted_loop_is_bitwise_generate(family):
    """With compaction off (the batch never shrinks) the loop makes the very forward calls
    `generate` makes, its in-place cache holding the values `torch.cat` gives: equal to the bit."""
    model = _model(family)
    prompts = _prompts()
    s = SamplingParams(n=2, temperature=1.0, max_new_tokens=24, stop_token_ids=[5, 6], seed=11)
    ref = HFGenerator(model, None, compact=False).generate(prompts, s)
    got = HFGenerator(model, None, compact_fraction=1.0).generate(prompts, s)
    assert [(c.token_ids, c.logprobs, c.finish_reason) for c in got] == \
        [(c.token_ids, c.logprobs, c.finish_reason) for c in ref]


def test_unpadded_batch_equals_generate():
    """Prompts of one length: `generate` drops the all-ones mask, so must the loop."""
    model = _model("qwen2")
    prompts = [p[:2] for p in _prompts()]
    s = SamplingParams(n=2, temperature=1.0, max_new_tokens=20, stop_token_ids=[5, 6], seed=2)
    ref = HFGenerator(model, None, compact=False).generate(prompts, s)
    got = HFGenerator(model, None, compact_fraction=0.0, compact_min_rows=1).generate(prompts, s)
    _assert_same(got, ref)
    whole = HFGenerator(model, None, compact_fraction=1.0).generate(prompts, s)
    assert [(c.token_ids, c.logprobs) for c in whole] == [(c.token_ids, c.logprobs) for c in ref]


@pytest.mark.parametrize("max_new,stops", [(1, []), (6, list(range(V)))])
def test_one_step_and_all_stop_at_once_equal_generate(max_new, stops):
    model = _model("qwen3")
    s = SamplingParams(n=2, temperature=1.0, max_new_tokens=max_new, stop_token_ids=stops, seed=4)
    ref = HFGenerator(model, None, compact=False).generate(_prompts(), s)
    got = HFGenerator(model, None, compact_fraction=0.0, compact_min_rows=1).generate(_prompts(), s)
    _assert_same(got, ref)
    assert all(len(c.token_ids) == 1 for c in got)


def test_batch_size_does_not_change_the_output():
    model = _model("qwen2")
    prompts = _prompts()
    s = SamplingParams(n=3, temperature=1.0, max_new_tokens=32, stop_token_ids=[5, 6], seed=5)
    outs = [HFGenerator(model, None, batch_size=b, compact_fraction=0.0, compact_min_rows=1).generate(prompts, s)
            for b in (1, 7, 64)]
    _spread(outs[2], 32)
    for out in outs[:2]:
        _assert_same(out, outs[2])


def test_compaction_waits_for_the_fraction_and_keeps_min_rows():
    """The batch shrinks once its finished rows reach `compact_fraction` of it, to its live rows
    topped up with finished ones to `compact_min_rows`; the output is unchanged."""
    model = _model("qwen2")
    prompts = _prompts()
    s = SamplingParams(n=3, temperature=1.0, max_new_tokens=32, stop_token_ids=[5, 6, 7, 8], seed=7)
    ref = HFGenerator(model, None, compact=False).generate(prompts, s)
    sizes = _batch_sizes(model)
    got = HFGenerator(model, None, compact_fraction=0.25, compact_min_rows=8).generate(prompts, s)
    _assert_same(got, ref)
    lengths = [len(c.token_ids) for c in ref]
    want, b = [len(ref)], len(ref)
    for k in range(1, max(lengths)):  # the forward computing token k, after tokens 0..k-1
        live = sum(n > k for n in lengths)
        size = max(live, min(8, b))
        if b - live > 0 and b - live >= 0.25 * b and size < b:
            b = size
        want.append(b)
    assert sizes == want
    assert min(want) == 8 and len(set(want)) > 2  # it did compact, more than once, down to the floor


def test_unsupported_model_falls_back_to_generate():
    """A model whose generation inputs are not the standard ones (here: a class overriding
    `prepare_inputs_for_generation`) generates through `generate`."""
    model = _model("llama")

    class Custom(type(model)):
        def prepare_inputs_for_generation(self, *args, **kwargs):
            return super().prepare_inputs_for_generation(*args, **kwargs)

    model.__class__ = Custom
    assert not supports_compact_decode(model)
    assert not HFGenerator(model, None).compact
    out = HFGenerator(model, None).generate(_prompts(2), SamplingParams(temperature=0, max_new_tokens=4))
    assert all(len(c.token_ids) >= 1 for c in out)


def test_bad_compact_fraction():
    with pytest.raises(ValueError, match="compact_fraction"):
        HFGenerator(_model("qwen2"), None, compact_fraction=1.5)


def test_config_option_reaches_the_generator_and_its_default_keeps_the_stage_hashes(tmp_path):
    """`generator.compact` (default true) picks the path; at its default it stays out of the
    stage input hashes (finished runs stay done: the default path gives generate's numbers)."""
    from engine.generation import build_generator
    from pipeline.config import load_config
    from pipeline.graph import build_graph, input_hashes

    model = _model("qwen2")
    model.save_pretrained(tmp_path / "m")
    TINY = pathlib.Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    cfg = load_config(TINY, check_files=False)
    assert cfg.generator.compact is True
    assert build_generator(cfg.generator, tmp_path / "m", device="cpu").compact
    off = load_config(TINY, ["generator.compact=false"], check_files=False)
    assert not build_generator(off.generator, tmp_path / "m", device="cpu").compact
    on = load_config(TINY, ["generator.compact=true"], check_files=False)
    h, h_on, h_off = (input_hashes(build_graph(c)) for c in (cfg, on, off))
    assert h == h_on
    assert h["prepare"] == h_off["prepare"] and h["grpo:math"] != h_off["grpo:math"]


def test_decode_steps_use_grouped_query_sdpa_and_the_setting_is_restored():
    """A CPU SDPA model decodes its one-token steps through `DECODE_ATTENTION` (keys/values not
    repeated per query head) and gets its own attention setting back afterwards; prefill stays
    transformers' SDPA. The outputs are `generate`'s, bit for bit, where the batch keeps its rows."""
    from engine.generation import DECODE_ATTENTION

    model = _model("qwen2")  # 4 query heads over 2 key/value heads
    assert model.config._attn_implementation == "sdpa"
    seen = []
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((kwargs["hidden_states"].shape[1], m.config._attn_implementation)),
        with_kwargs=True)
    s = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=9)
    got = HFGenerator(model, None, compact_fraction=1.0).generate(_prompts(), s)
    assert seen[0][1] == DECODE_ATTENTION and {q for q, _ in seen[1:]} == {1}
    assert {impl for _, impl in seen} == {DECODE_ATTENTION}
    assert model.config._attn_implementation == "sdpa"
    seen.clear()
    ref = HFGenerator(model, None, compact=False).generate(_prompts(), s)
    assert {impl for _, impl in seen} == {"sdpa"}
    assert [(c.token_ids, c.logprobs) for c in got] == [(c.token_ids, c.logprobs) for c in ref]
