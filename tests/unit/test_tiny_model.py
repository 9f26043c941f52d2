"""The tiny model and tokenizer round-trip through save_pretrained/from_pretrained."""

import torch

from engine.chat import render
from engine.model import TinySpec, load_model, load_tokenizer, materialize_tiny


def test_round_trip_keeps_weights_text_and_chat_template(tmp_path):
    d = materialize_tiny(TinySpec(hidden_size=64, num_layers=2, intermediate_size=128), tmp_path / "m", seed=0)
    model, tok = load_model(d), load_tokenizer(d)
    text = 'def f(x):\n    return x * 3  # <tool_call><invoke name="add"></invoke></tool_call> \\boxed{4}'
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # spaces included
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(d))  # no project code: transformers picks the class
    assert plain(text, add_special_tokens=False)["input_ids"] == ids and plain.decode(ids) == text
    assert len(ids) < len(text)  # tags are single tokens
    msgs = [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c d"},
            {"role": "tool", "content": "5"}, {"role": "assistant", "content": "e"}]
    assert list(tok.apply_chat_template(msgs, tokenize=True)["input_ids"]) == render(msgs, tok).input_ids
    again = load_model(d)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    out = model.generate(torch.tensor([ids[:5]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)
