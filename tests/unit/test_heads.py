"""Teacher heads: extraction (tied, untied, sharded), exactness, residency, vocabulary check."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open

import distill.heads as heads
from distill.cache import forward_prenorm_hidden
from distill.heads import (HEAD_SPECS, HeadManager, HeadSpec, TeacherHead, TeacherOrderError, VocabMismatchError,
                           assert_same_vocab, extract_head, get_head_spec, register_head_spec)

torch.set_num_threads(1)
VOCAB = 97


def save_tiny(path, *, tied=False, arch="qwen2", seed=0, vocab=VOCAB, max_shard_size=None):
    import transformers

    kw = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=tied)
    cfg_cls, model_cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                          "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[arch]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kw)).eval()
    with torch.no_grad():  # a non-trivial final norm, so a head without it would not match
        model.model.norm.weight.uniform_(0.5, 1.5)
    extra = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **extra)
    return model


def model_logits_and_prenorm(model, ids):
    out = model(input_ids=ids, output_hidden_states=True)
    pre = forward_prenorm_hidden(model, ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
    return out, pre


@pytest.mark.parametrize("tied,arch,shard", [(False, "qwen2", None), (True, "qwen2", None),
                                             (False, "qwen2", "20KB"), (False, "llama", None)])
def test_head_reproduces_model_logits_exactly(tmp_path, tied, arch, shard):
    model = save_tiny(tmp_path / "m", tied=tied, arch=arch, max_shard_size=shard)
    if shard:
        assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    if tied:
        with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys()  # save_pretrained drops the tied copy
    path = extract_head(tmp_path / "m", tmp_path / "head.safetensors")
    head = TeacherHead.load(path)
    assert (head.vocab_size, head.hidden_size, head.model_type) == (VOCAB, 64, arch)
    ids = torch.randint(0, VOCAB, (1, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, pre = model_logits_and_prenorm(model, ids)
        got = head(pre[0])  # (T, V)
    assert got.dtype == torch.float32
    assert torch.equal(got, out.logits[0])  # bit for bit in fp32


def test_hidden_states_last_is_post_norm_in_this_transformers(tmp_path):
    # Why cache.py hooks the norm's input: hidden_states[-1] is already normalised.
    model = save_tiny(tmp_path / "m")
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out, pre = model_logits_and_prenorm(model, ids)
        assert torch.equal(out.hidden_states[-1], model.model.norm(pre))
        assert not torch.allclose(out.hidden_states[-1], pre, atol=1e-3)


def test_extract_reads_only_head_tensors(tmp_path, monkeypatch):
    save_tiny(tmp_path / "m", max_shard_size="20KB")
    read = []
    real = heads.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.f = real(*a, **k)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *a):
            return self.f.__exit__(*a)

        def get_tensor(self, name):
            read.append(name)
            return self.inner.get_tensor(name)

        def keys(self):
            return self.inner.keys()

    monkeypatch.setattr(heads, "safe_open", Spy)
    extract_head(tmp_path / "m", tmp_path / "head.safetensors")
    assert sorted(read) == ["lm_head.weight", "model.norm.weight"]


def test_extract_errors_name_the_problem(tmp_path):
    save_tiny(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KeyError, match="gpt_neox.*known: .*qwen2"):
        extract_head(tmp_path / "m", tmp_path / "h.safetensors")
    (tmp_path / "m" / "model.safetensors").unlink()
    cfg["model_type"] = "qwen2"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        extract_head(tmp_path / "m", tmp_path / "h.safetensors")
    with pytest.raises(ValueError, match="already registered"):
        register_head_spec("qwen2", HeadSpec("a", "b", "c"))
    assert get_head_spec("llama").lm_head == "lm_head.weight" and "llama" in HEAD_SPECS.names()
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        TeacherHead.load(tmp_path / "bad.safetensors")


@pytest.fixture
def three_heads(tmp_path):
    paths = []
    for i in range(3):
        save_tiny(tmp_path / f"t{i}", seed=i)
        paths.append(str(extract_head(tmp_path / f"t{i}", tmp_path / f"t{i}" / "head.safetensors")))
    return paths


def test_head_manager_loads_once_per_teacher_per_step(three_heads):
    mgr = HeadManager(three_heads, device="cpu", prefetch=True)
    x = torch.randn(4, 64)
    for teachers in ([0, 0, 1, 2, 2], [0, 2], [1, 1, 1]):
        mgr.begin_step()
        prev = None
        for t in teachers:
            head = mgr.activate(t)
            assert mgr.resident_index == t
            if prev is not None and prev is not head:
                assert prev.released  # the previous head was released before this one was loaded
                with pytest.raises(RuntimeError, match="released"):
                    prev(x)
            head(x)
            prev = head
        mgr.end_step()
    assert mgr.head_loads_per_step == [3, 2, 1]
    assert mgr.max_resident_heads == 1
    assert mgr.total_loads == 6 and mgr.prefetch_hits >= 3
    mgr.close()


def test_head_manager_refuses_out_of_order_and_misuse(three_heads):
    mgr = HeadManager(three_heads, prefetch=False)
    with pytest.raises(RuntimeError, match="begin_step"):
        mgr.activate(0)
    mgr.begin_step()
    mgr.activate(1)
    mgr.activate(2)
    with pytest.raises(TeacherOrderError, match="teacher 1 requested after teacher 2"):
        mgr.activate(1)
    with pytest.raises(IndexError, match="out of range"):
        mgr.activate(3)
    assert mgr.end_step() == 2
    mgr.begin_step()
    mgr.activate(0)  # a new step starts again from any teacher
    with pytest.raises(RuntimeError, match="twice"):
        mgr.begin_step()


def test_head_manager_matches_direct_load(three_heads):
    mgr = HeadManager(three_heads, prefetch=True)
    x = torch.randn(5, 64)
    mgr.begin_step()
    for i, p in enumerate(three_heads):
        assert torch.equal(mgr.activate(i)(x), TeacherHead.load(p)(x))  # prefetched == loaded directly
    mgr.end_step()
    mgr.close()


def _with_tokenizer(path, vocab):
    tok = {"model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
           "added_tokens": [{"id": len(vocab), "content": "<|end|>", "special": True}]}
    (path / "tokenizer.json").write_text(json.dumps(tok))


def test_assert_same_vocab(tmp_path):
    base = {f"c{i}": i for i in range(VOCAB - 1)}
    for name in ("s", "a", "b"):
        save_tiny(tmp_path / name)
        _with_tokenizer(tmp_path / name, base)
    assert_same_vocab(tmp_path / "s", [tmp_path / "a", tmp_path / "b"])
    _with_tokenizer(tmp_path / "b", {**base, "c3": 5, "c5": 3})  # two ids swapped
    with pytest.raises(VocabMismatchError, match="tokenizer of teacher .*b"):
        assert_same_vocab(tmp_path / "s", [tmp_path / "a", tmp_path / "b"])
    shutil.rmtree(tmp_path / "b")
    save_tiny(tmp_path / "b", vocab=VOCAB + 3)
    with pytest.raises(VocabMismatchError, match="vocab_size"):
        assert_same_vocab(tmp_path / "s", [tmp_path / "b"])
    (tmp_path / "a" / "tokenizer.json").unlink()
    with pytest.raises(VocabMismatchError, match="cannot compare"):
        assert_same_vocab(tmp_path / "s", [tmp_path / "a"])


@pytest.mark.parametrize("leak", ["weight", "view", "logits_graph"])
def test_residency_is_measured_a_stray_reference_counts(three_heads, leak):
    """`max_resident_heads` is the heads whose tensor memory is alive at an activation
    (weak references to their storages), not a counter: a stray reference to head 0's
    projection, or to a view of it, keeps it resident when head 1 loads, and the figure is 2
    (the bytes figure adds the projection's). A logits graph that outlives its backward holds no head weight
    (the loss saves none), so it stays 1."""
    mgr = HeadManager(three_heads, prefetch=False)
    mgr.begin_step()
    head0 = mgr.activate(0)
    one_head = mgr.max_resident_bytes
    assert mgr.resident_heads() == (1, one_head) and one_head == head0.nbytes
    proj_bytes = head0.proj_weight.nbytes
    x = torch.randn(3, 64, requires_grad=True)
    stray = {"weight": head0.proj_weight, "view": head0.proj_weight[:5],
             "logits_graph": head0(x).sum()}[leak]
    if leak == "logits_graph":
        stray.backward()
    mgr.activate(1)
    expect = 1 if leak == "logits_graph" else 2
    assert mgr.max_resident_heads == expect
    # the stray keeps head 0's projection (its norm weight was freed), beside head 1
    assert mgr.max_resident_bytes == (one_head if expect == 1 else one_head + proj_bytes)
    del stray
    assert mgr.resident_heads() == (1, one_head)  # the leak gone, only head 1 remains
    mgr.end_step()
    assert mgr.resident_heads() == (0, 0)
