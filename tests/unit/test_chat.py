"""Chat through the tokenizer's template: the tiny format is unchanged, token for token,
and the generic path (generation markers, or prefix rendering) gives exact masks for any
template (the project's tiny one, a ChatML one with <think>, a Llama-3-style one)."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from engine import chat
from engine.domains import get_domain, known_domains
from engine.model import TinySpec, materialize_tiny
from engine.tokenizer import build_tiny_tokenizer

# ---------------------------------------------------------------- the tiny format, as it was
_ROLE = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>", "tool": "<|tool|>"}


def legacy_render(messages, tok, add_generation_prompt=False):
    """The tiny format before templates drove rendering (segment by segment)."""
    ids, mask = [], []
    for m in messages:
        if m["role"] == "tool":
            segs = [(f"<|tool|><tool_response>{m['content']}</tool_response><|end|>", 0)]
        elif m["role"] == "assistant":
            segs = [("<|assistant|>", 0), (m["content"] + "<|end|>", 1)]
        else:
            segs = [(f"{_ROLE[m['role']]}{m['content']}<|end|>", 0)]
        for text, trained in segs:
            piece = chat.encode(tok, text)
            ids += piece
            mask += [trained] * len(piece)
    if add_generation_prompt:
        ids += chat.encode(tok, "<|assistant|>")
        mask += [0]
    return ids, mask


@pytest.fixture(scope="module")
def tiny_tokenizers(tmp_path_factory):
    d = materialize_tiny(TinySpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64),
                         tmp_path_factory.mktemp("tiny") / "m", seed=0)
    return [build_tiny_tokenizer(), AutoTokenizer.from_pretrained(str(d))]


@pytest.mark.parametrize("name", known_domains())
def test_tiny_domains_render_identically_through_the_template(name, tiny_tokenizers):
    rows = get_domain(name).generate("train", 60, seed=0) + get_domain(name).generate("eval", 20, seed=0)
    for tok in tiny_tokenizers:
        assert chat.has_generation_markers(tok)
        for r in rows:
            ids, mask = legacy_render(r["messages"], tok)
            got = chat.render(r["messages"], tok)
            assert (got.input_ids, got.loss_mask) == (ids, mask), r["id"]
            prompt = chat.prompt_messages(r["messages"])
            assert chat.render_prompt(r["messages"], tok) == legacy_render(prompt, tok, True)[0]
            assert chat.render_prompt(r["messages"], tok) == list(
                tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)["input_ids"])
    if name == "tool":
        assert any(m["role"] == "tool" for r in rows for m in r["messages"])  # multi-turn episodes covered


def test_tiny_tool_result_and_end_of_turn(tiny_tokenizers):
    for tok in tiny_tokenizers:
        want = chat.encode(tok, "<|end|><|tool|><tool_response>5 x</tool_response><|end|><|assistant|>")
        assert chat.tool_result_ids(tok, "5 x") == want
        assert chat.end_of_turn_ids(tok) == [tok.convert_tokens_to_ids("<|end|>")] == [tok.eos_token_id]


# ---------------------------------------------------------------- other templates
def _byte_bpe(specials: list[str], eos: str, template: str) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte) with `specials`, built offline."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=specials[0])
    fast.chat_template = template
    return fast


LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
CHATML_TEMPLATE = (  # generation markers around the assistant's content and <|im_end|>
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def llama3():
    return _byte_bpe(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                      "<|end_of_text|>"], "<|end_of_text|>", LLAMA3_TEMPLATE)


@pytest.fixture(scope="module")
def chatml():
    return _byte_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|endoftext|>", CHATML_TEMPLATE)


EPISODE = [{"role": "system", "content": "You call tools."}, {"role": "user", "content": "weather in Oslo?"},
           {"role": "assistant", "content": "<think>need a call</think><tool_call>get(Oslo)</tool_call>"},
           {"role": "tool", "content": "drizzle"}, {"role": "assistant", "content": "It rains."}]


def _assistant_spans(tok, messages, eot):
    """Expected mask worked out from text: each assistant content + its end-of-turn token."""
    ids = chat.render(messages, tok).input_ids
    text = tok.decode(ids)
    want = [0] * len(ids)
    for m in messages:
        if m["role"] == "assistant":
            target = chat.encode(tok, m["content"].strip() + eot)
            for s in range(len(ids) - len(target) + 1):
                if ids[s:s + len(target)] == target:
                    want[s:s + len(target)] = [1] * len(target)
                    break
            else:
                raise AssertionError(f"{m['content']!r} not found in {text!r}")
    return want


@pytest.mark.parametrize("which,eot", [("llama3", "<|eot_id|>"), ("chatml", "<|im_end|>")])
def test_other_templates_prompt_mask_and_stops(which, eot, request):
    tok = request.getfixturevalue(which)
    assert chat.has_generation_markers(tok) == (which == "chatml")  # both paths exercised
    prompt = chat.prompt_messages(EPISODE)
    assert chat.render_prompt(EPISODE, tok) == list(
        tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)["input_ids"])
    r = chat.render(EPISODE, tok)
    assert r.input_ids == list(tok.apply_chat_template(EPISODE, tokenize=True)["input_ids"])
    assert r.loss_mask == _assistant_spans(tok, EPISODE, eot)
    trained = tok.decode([t for t, m in zip(r.input_ids, r.loss_mask) if m])
    assert "drizzle" not in trained and "Oslo?" not in trained and trained.count(eot) == 2
    eot_id = tok.convert_tokens_to_ids(eot)
    assert chat.end_of_turn_ids(tok) == [tok.eos_token_id, eot_id]
    # the injected tool turn continues the assistant's tool call exactly as the template renders it
    upto_call = chat.render(EPISODE[:3], tok).input_ids
    call_end = max(i for i, m in enumerate(chat.render(EPISODE[:3], tok).loss_mask) if m)
    assert r.input_ids[:call_end] + chat.tool_result_ids(tok, "drizzle") == chat.render(
        EPISODE[:4], tok, add_generation_prompt=True).input_ids
    assert upto_call[call_end] == eot_id


def test_template_that_rewrites_history_is_rejected_without_markers(llama3):
    tok = _byte_bpe(["<|x|>", "<|eot_id|>"], "<|eot_id|>",
                    "{%- for m in messages %}{%- if loop.last or m['role'] != 'assistant' %}"
                    "{{- m['role'] + ':' + m['content'] + '<|eot_id|>' }}{%- endif %}{%- endfor %}"
                    "{%- if add_generation_prompt %}assistant:{%- endif %}")
    with pytest.raises(chat.ChatTemplateError, match="generation"):
        chat.render(EPISODE, tok)
    tok.chat_template = None
    with pytest.raises(chat.ChatTemplateError, match="model.chat_template"):
        chat.render_prompt(EPISODE, tok)


def test_hf_generation_stops_at_the_templates_end_of_turn(llama3):
    """A model that emits <|eot_id|> (not its EOS) stops there with the HF generator."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.generation import HFGenerator, SamplingParams

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(llama3), hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                                         tie_word_embeddings=False, eos_token_id=llama3.eos_token_id,
                                         pad_token_id=llama3.pad_token_id, bos_token_id=None))
    prompt = chat.render_prompt([{"role": "user", "content": "say something"}], llama3)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    eot = llama3.convert_tokens_to_ids("<|eot_id|>")
    no_template = _byte_bpe(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                             "<|end_of_text|>"], "<|end_of_text|>", None)
    free = HFGenerator(model, no_template).generate([prompt], greedy)[0]  # stops at EOS only
    k = 3
    assert eot not in free.token_ids[:k + 1] and len(free.token_ids) == 12
    # <|eot_id|> gets the lm_head row of the 4th token: equal logits, and argmax takes the
    # lower id, so the model now emits <|eot_id|> exactly where it emitted that token.
    with torch.no_grad():
        model.lm_head.weight[eot] = model.lm_head.weight[free.token_ids[k]]
    out = HFGenerator(model, llama3).generate([prompt], greedy)[0]
    assert out.token_ids == free.token_ids[:k] + [eot] and out.finish_reason == "stop"
    runs_on = HFGenerator(model, no_template).generate([prompt], greedy)[0]
    assert runs_on.token_ids[:k + 1] == free.token_ids[:k] + [eot] and len(runs_on.token_ids) > k + 1
