"""Chat handling against the behaviour of six model families' templates
(tests/fixtures/templates/: Qwen3, ChatML/Qwen2.5, Llama 3.x, DeepSeek-R1, Gemma, Mistral):
prompts equal `apply_chat_template(..., add_generation_prompt=True)` token for token, SFT
masks cover exactly the assistant's reply and its end of turn (never a template-inserted
empty think block, a BOS or a tool result), the end-of-turn ids, the HF generator stopping
there, and the ids export writes into generation_config.json."""

import json
import sys
from pathlib import Path

import pytest

from engine import chat
from engine.modes import mode_template_kwargs

sys.path.insert(0, str(Path(__file__).parents[1] / "fixtures" / "templates"))
from families import FAMILIES, build_family_tokenizer  # noqa: E402

NAMES = sorted(FAMILIES)
THOUGHT = "<think>\nadd\n</think>\n\n4"
BASIC = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": THOUGHT}, {"role": "user", "content": "3+3?"},
         {"role": "assistant", "content": "6"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_EPISODE = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "content": '{"sky": "sunny"}'},
                {"role": "assistant", "content": "It is sunny."}]

# What each family trains on in BASIC, worked out from its documented template behaviour.
EXPECTED_BASIC = {
    "qwen3": ["4<|im_end|>", "6<|im_end|>"],  # history reasoning dropped; empty <think> on the last turn not trained
    "chatml": [THOUGHT + "<|im_end|>", "6<|im_end|>"],
    "llama3": [THOUGHT + "<|eot_id|>", "6<|eot_id|>"],
    "deepseek_r1": ["\n\n4<｜end▁of▁sentence｜>", "6<｜end▁of▁sentence｜>"],  # reasoning dropped from every turn
    "gemma": [THOUGHT + "<end_of_turn>", "6<end_of_turn>"],
    "mistral": [" " + THOUGHT + "</s>", " 6</s>"],  # the reply follows [/INST] after a space
}
EXPECTED_TOOL = {
    "qwen3": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
              "It is sunny.<|im_end|>"],
    "chatml": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
               "It is sunny.<|im_end|>"],
    "llama3": ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', "It is sunny.<|eot_id|>"],
    "deepseek_r1": ["<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
                    '{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>',
                    "It is sunny.<｜end▁of▁sentence｜>"],
    "mistral": ['[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00000"}]</s>',
                " It is sunny.</s>"],
}


@pytest.fixture(scope="module")
def toks():
    return {n: build_family_tokenizer(FAMILIES[n]) for n in NAMES}


def masked_segments(tok, rendered: chat.Rendered) -> list[str]:
    """The text of each run of trained tokens."""
    runs, cur = [], []
    for t, m in zip(rendered.input_ids, rendered.loss_mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def _hf_prompt(tok, messages, **kw):
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("name", NAMES)
def test_prompt_equals_apply_chat_template_token_for_token(name, toks):
    tok, fam = toks[name], FAMILIES[name]
    kwargs = [{}, *(mode_template_kwargs(m) for m in ("non-think", "think-high"))] if fam.thinks else [{}]
    for kw in kwargs:
        for convo in (BASIC[:2], BASIC[:4]):
            got = chat.render(convo, tok, add_generation_prompt=True, **kw).input_ids
            assert got == _hf_prompt(tok, convo, **kw)
            if convo == BASIC[:2]:  # a data row's prompt path
                assert chat.render_prompt(convo + BASIC[2:], tok, **kw) == got
            if fam.bos:  # the template writes BOS once; the tokenizer's own BOS is not added again
                bos = tok.convert_tokens_to_ids(fam.bos)
                assert got.count(bos) == 1 and got[0] == bos
                assert tok(fam.bos + "x")["input_ids"][:2] == [bos, bos]  # the tokenizer would add one
    if name == "qwen3":
        off = tok.decode(chat.render_prompt(BASIC[:2], tok, enable_thinking=False), skip_special_tokens=False)
        assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    if name == "deepseek_r1":
        assert tok.decode(chat.render_prompt(BASIC[:2], tok)).endswith("<｜Assistant｜><think>\n")
    if name == "gemma":  # no system role: the system text opens the first user turn
        text = tok.decode(chat.render_prompt(BASIC[:2], tok), skip_special_tokens=False)
        assert text == "<bos><start_of_turn>user\nBe brief.\n\n2+2?<end_of_turn>\n<start_of_turn>model\n"
    if name == "mistral":
        text = tok.decode(chat.render(BASIC[:4], tok, add_generation_prompt=True).input_ids,
                          skip_special_tokens=False)
        assert text.endswith("[INST] Be brief.\n\n3+3?[/INST]") and text.startswith("<s>[INST] 2+2?[/INST]")


@pytest.mark.parametrize("name", NAMES)
def test_sft_mask_covers_exactly_the_reply_and_its_end_of_turn(name, toks):
    tok, fam = toks[name], FAMILIES[name]
    r = chat.render(BASIC, tok)
    assert r.input_ids == chat.encode(tok, chat.render_text(BASIC, tok))
    assert masked_segments(tok, r) == EXPECTED_BASIC[name]
    assert r.loss_mask[0] == 0  # never BOS or the system turn
    # each trained run ends in the family's end of turn
    eot = tok.convert_tokens_to_ids(fam.end_of_turn)
    ends = [i for i in range(len(r.loss_mask)) if r.loss_mask[i] and (i + 1 == len(r.loss_mask) or not r.loss_mask[i + 1])]
    assert [r.input_ids[i] for i in ends] == [eot, eot]


def test_qwen3_modes_and_kept_reasoning(toks):
    tok = toks["qwen3"]
    for mode in ("non-think", "think-high", "think-max"):
        r = chat.render(BASIC, tok, **mode_template_kwargs(mode))
        assert masked_segments(tok, r) == ["4<|im_end|>", "6<|im_end|>"], mode
    # reasoning on the last turn is the model's own output: trained, markers included
    last = BASIC[:4] + [{"role": "assistant", "content": "<think>\nadd 3\n</think>\n\n6"}]
    assert masked_segments(tok, chat.render(last, tok)) == ["4<|im_end|>", "<think>\nadd 3\n</think>\n\n6<|im_end|>"]
    # reasoning_content as a field renders the same way
    field = BASIC[:4] + [{"role": "assistant", "content": "6", "reasoning_content": "add 3"}]
    assert chat.render(field, tok).input_ids == chat.render(last, tok).input_ids
    # the template does insert the empty block, and it is left out of the loss
    text = chat.render_text(BASIC, tok)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n6<|im_end|>\n")


@pytest.mark.parametrize("name", sorted(EXPECTED_TOOL))
def test_tool_episode_mask_leaves_out_tool_results(name, toks):
    tok = toks[name]
    r = chat.render(TOOL_EPISODE, tok, tools=[WEATHER])
    assert masked_segments(tok, r) == EXPECTED_TOOL[name]
    text = tok.decode(r.input_ids, skip_special_tokens=False)
    assert "sunny" in text.split("It is")[0]  # the tool result is rendered, in the template's tool turn, untrained
    assert _hf_prompt(tok, TOOL_EPISODE[:3], tools=[WEATHER]) == chat.render(
        TOOL_EPISODE[:3], tok, add_generation_prompt=True, tools=[WEATHER]).input_ids


def test_family_tool_roles(toks):
    llama = toks["llama3"].decode(chat.render(TOOL_EPISODE, toks["llama3"], tools=[WEATHER]).input_ids)
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n{\"sky\": \"sunny\"}<|eot_id|>" in llama
    assert "Environment: ipython" in llama
    qwen = toks["qwen3"].decode(chat.render(TOOL_EPISODE, toks["qwen3"], tools=[WEATHER]).input_ids)
    assert '<|im_start|>user\n<tool_response>\n{"sky": "sunny"}\n</tool_response><|im_end|>' in qwen
    assert qwen.startswith("<|im_start|>system\n# Tools") and '"name": "get_weather"' in qwen.split("<|im_end|>")[0]
    with pytest.raises(Exception, match="alternate"):  # Gemma has no tool role
        chat.render(TOOL_EPISODE, toks["gemma"])


@pytest.mark.parametrize("name", NAMES)
def test_end_of_turn_ids(name, toks):
    tok, fam = toks[name], FAMILIES[name]
    want = [tok.convert_tokens_to_ids(t) for t in dict.fromkeys([fam.eos, fam.end_of_turn])]
    assert chat.end_of_turn_ids(tok) == want
    if name == "llama3":  # <|eot_id|> ends a turn while EOS is another token
        assert tok.eos_token == "<|end_of_text|>" and len(want) == 2


@pytest.mark.parametrize("name", ["qwen3", "chatml", "deepseek_r1", "llama3", "mistral"])
def test_tool_result_ids_reopen_the_assistant_turn(name, toks):
    """The tokens injected after a tool call are what the template writes between the call
    and the next generation prompt."""
    tok = toks[name]
    prompt = chat.render_text(TOOL_EPISODE[:3], tok, True, tools=[WEATHER])
    injected = tok.decode(chat.tool_result_ids(tok, '{"sky": "sunny"}', tools=[WEATHER]), skip_special_tokens=False)
    assert prompt.endswith(injected) and "sunny" in injected


def _toy_model(tok, name):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    kw = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
              intermediate_size=64, tie_word_embeddings=False, pad_token_id=tok.pad_token_id, bos_token_id=None,
              eos_token_id=tok.pad_token_id)  # the config's EOS is never what ends a turn here
    if name == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(head_dim=16, **kw))
    return LlamaForCausalLM(LlamaConfig(**kw))


@pytest.mark.parametrize("name", NAMES)
def test_hf_generator_stops_at_the_familys_end_of_turn(name, toks):
    import torch

    from engine.generation import HFGenerator, SamplingParams

    tok, fam = toks[name], FAMILIES[name]
    model = _toy_model(tok, name)
    prompt = chat.render_prompt(BASIC[:2], tok)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10)
    eot = tok.convert_tokens_to_ids(fam.end_of_turn)
    free = HFGenerator(model, None).generate([prompt], greedy)[0]
    k = 3
    assert eot not in free.token_ids[:k + 1] and len(free.token_ids) == 10
    with torch.no_grad():  # the end of turn gets the 4th token's lm_head row; argmax takes the lower id
        model.lm_head.weight[eot] = model.lm_head.weight[free.token_ids[k]]
    assert eot < free.token_ids[k]
    out = HFGenerator(model, tok).generate([prompt], greedy)[0]
    assert out.token_ids == free.token_ids[:k] + [eot] and out.finish_reason == "stop"


@pytest.mark.parametrize("name", NAMES)
def test_export_writes_the_end_of_turn_ids(name, toks, tmp_path):
    from transformers import GenerationConfig

    from engine.export import export_final

    tok, fam = toks[name], FAMILIES[name]
    model = _toy_model(tok, name)
    model.config.eos_token_id = tok.eos_token_id
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(tmp_path / "ckpt")
    out = export_final(tmp_path / "ckpt", tmp_path / "final", tok)
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    assert tok.convert_tokens_to_ids(fam.end_of_turn) in eos and tok.eos_token_id in eos
    assert chat.render_prompt(BASIC[:2], tok) == chat.render_prompt(
        BASIC[:2], __import__("transformers").AutoTokenizer.from_pretrained(str(out)))


@pytest.mark.parametrize("name", NAMES)
def test_vllm_generator_stop_ids_hold_the_familys_end_of_turn(name, toks, tmp_path):
    """The vLLM generator runs with `skip_tokenizer_init`: it stops only on the ids it is
    given (`engine.generation_vllm._end_ids`). Checked here without vLLM (not installed on
    CPU); a generation with vLLM itself is a GPU test."""
    from engine.generation_vllm import _end_ids

    tok, fam = toks[name], FAMILIES[name]
    config = {"eos_token_id": tok.eos_token_id}
    ids = _end_ids(config, tok, tmp_path)
    assert tok.convert_tokens_to_ids(fam.end_of_turn) in ids and tok.eos_token_id in ids
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [tok.convert_tokens_to_ids(t) for t in fam.generation_eos]}))
    ids = _end_ids(config, None, tmp_path)  # no tokenizer: a shipped generation_config alone must carry it
    assert tok.convert_tokens_to_ids(fam.end_of_turn) in ids
