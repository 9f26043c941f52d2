"""A real-shaped toy base model, built offline: Qwen3 architecture, byte-level BPE, ChatML.

`model.base: toy_hf` (configs/small-hf.yaml) builds this in `prepare`; it stands in for a
hub chat model such as Qwen3 so CI exercises the path a real model takes: a
`Qwen3ForCausalLM` with random weights at toy size, and a byte-level BPE tokenizer
trained with `tokenizers` on a fixed built-in corpus (any text encodes, by bytes at
worst), whose chat template is ChatML with `<think>` reasoning in the Qwen3 style and
tool results in the user turn inside `<tool_response>`. Like Qwen3's own template it
has no `{% generation %}` markers, so SFT masks come from rendering prefixes
(`engine.chat`). Special tokens: `<|endoftext|>` (EOS, pad), `<|im_start|>`,
`<|im_end|>` (end of turn); added tokens: `<think>`, `</think>`, `<tool_call>`,
`</tool_call>`, `<tool_response>`, `</tool_response>`.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, PositiveInt

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- elif message['role'] == 'assistant' and enable_thinking is defined and enable_thinking is false %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Text the BPE merges are learned from: the shapes of the rows the toy experiment reads.
CORPUS = [
    "What is the total? Each pen costs 3 dollars and she buys 4 pens, so 3 * 4 = 12. The answer is \\boxed{12}.",
    "Write a python function to find the minimum of two numbers.\ndef min_of_two(a, b):\n    return a if a < b else b",
    "assert min_of_two(1, 2) == 1\nassert f(3) == 9\nimport math\nfor i in range(10):\n    print(i)",
    "Write a short poem about the sea. Your response should contain at least 3 sentences and no commas.",
    'You can call these tools: [{"type": "function", "function": {"name": "get_weather", "parameters": '
    '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]',
    '<tool_call><invoke name="get_weather"><parameter name="city">Berlin</parameter></invoke></tool_call>',
    "<think>\nLet me work through this step by step.\n</think>\n\nThe weather in Berlin is sunny.",
]


class ToyHFSpec(BaseModel):
    """Sizes of the toy Qwen3 model and its BPE vocabulary."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden_size: PositiveInt = 64
    num_layers: PositiveInt = 2
    num_heads: PositiveInt = 4
    num_kv_heads: PositiveInt = 2
    head_dim: PositiveInt = 16
    intermediate_size: PositiveInt = 128
    vocab_size: PositiveInt = 512
    max_position_embeddings: PositiveInt = 2048


def build_toy_tokenizer(vocab_size: int = 512):
    """Byte-level BPE trained on `CORPUS`, with ChatML specials and the tool/think tags."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + TAGS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                   clean_up_tokenization_spaces=False, model_max_length=32768)
    fast.add_tokens(TAGS)  # not special: they decode as text, so verifiers see the tool calls
    fast.chat_template = CHAT_TEMPLATE
    return fast


def materialize_toy_hf(spec: ToyHFSpec, out_dir: str | os.PathLike, seed: int) -> Path:
    """Build the random toy Qwen3 model + tokenizer and save both to `out_dir` atomically."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3Config

    out = Path(out_dir)
    tokenizer = build_toy_tokenizer(spec.vocab_size)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen3Config(vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=spec.hidden_size,
                         num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                         num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                         intermediate_size=spec.intermediate_size,
                         max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # As Qwen3 ships it: generation stops at <|im_end|> as well as at EOS.
    model.generation_config = GenerationConfig(eos_token_id=[im_end, tokenizer.eos_token_id],
                                               pad_token_id=tokenizer.pad_token_id)
    from engine.model import save_model_dir

    return save_model_dir(model, tokenizer, out)


if __name__ == "__main__":  # python -m engine.toy_hf OUT_DIR [SEED]
    import sys

    print(materialize_toy_hf(ToyHFSpec(), sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0))
