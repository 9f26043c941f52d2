"""The real-shaped toy base (engine/toy_hf.py): plain transformers loads it; its template
(ChatML + <think>, no generation markers) gives masks by prefix rendering: the assistant's
tokens and <|im_end|>, not the newline after it, nothing of the tool result."""

import pytest

from engine import chat
from engine.toy_hf import ToyHFSpec, build_toy_tokenizer, materialize_toy_hf


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from transformers import AutoTokenizer

    d = materialize_toy_hf(ToyHFSpec(hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64),
                           tmp_path_factory.mktemp("toy") / "m", seed=0)
    return d, AutoTokenizer.from_pretrained(str(d))


def test_auto_classes_load_it_and_text_round_trips(toy):
    from transformers import AutoModelForCausalLM

    d, tok = toy
    assert type(AutoModelForCausalLM.from_pretrained(str(d))).__name__ == "Qwen3ForCausalLM"
    text = "Héllo  wörld\n\t<tool_call>x</tool_call> 3 * 4 = 12 <think>ok</think> 日本"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok("<tool_call>")["input_ids"] == [tok.convert_tokens_to_ids("<tool_call>")]
    assert build_toy_tokenizer().get_vocab() == tok.get_vocab()  # deterministic build


def test_prefix_masks_tool_turns_and_stop_ids(toy):
    d, tok = toy
    assert not chat.has_generation_markers(tok)
    msgs = [{"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": "<think>add</think><tool_call>add(2, 3)</tool_call>"},
            {"role": "tool", "content": "5"}, {"role": "assistant", "content": "\\boxed{5}"}]
    r = chat.render(msgs, tok)
    assert r.input_ids == list(tok.apply_chat_template(msgs)["input_ids"])
    trained = tok.decode([t for t, m in zip(r.input_ids, r.loss_mask) if m])
    assert trained == "<think>add</think><tool_call>add(2, 3)</tool_call><|im_end|>\\boxed{5}<|im_end|>"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert chat.end_of_turn_ids(tok, d) == [tok.eos_token_id, im_end]
    assert tok.decode(chat.tool_result_ids(tok, "5")) == (
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert chat.tool_call_end_id(tok) == tok.convert_tokens_to_ids("</tool_call>")
