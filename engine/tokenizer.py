"""An offline character-level tokenizer with the chat and tool-call tokens.

Nothing is downloaded: the vocabulary is printable ASCII plus newline and tab, the chat
role markers (special tokens) and a few multi-character tool-call/answer tags (added
tokens that decode as text). Each added tag is one token, so an XML tool call costs a
handful of tokens instead of ~80 characters; the tiny models learn the format quickly.

It is stored as a byte-level BPE with no merges: the vocabulary entries are the
GPT-2 byte-level spellings of the characters (space is `Ġ`, newline `Ċ`, tab `ĉ`), so
every HF loader, whichever class `AutoTokenizer` picks for the model type (transformers
rebuilds any `qwen2` tokenizer as a byte-level `Qwen2Tokenizer`), encodes and decodes
text the same way, spaces included; the ids are those of the original character
vocabulary. Characters outside it (non-ASCII) have no token.

The chat template renders the tiny format (`<|ROLE|>content<|end|>`, tool results as
`<|tool|><tool_response>...</tool_response><|end|>`) and marks each assistant turn with
`{% generation %}`, so `return_assistant_tokens_mask` gives the SFT loss mask. Given
`enable_thinking=False` (non-think mode, engine.modes), it writes an empty
`<think></think>` after each assistant header and after the generation prompt, as Qwen3's
template does; without the kwarg it renders exactly as before.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import PreTrainedTokenizerFast

PAD = "<|pad|>"
EOS = "<|end|>"
ROLE_TOKENS = {
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "tool": "<|tool|>",
}
SPECIAL_TOKENS = [PAD, EOS, *ROLE_TOKENS.values()]
TAG_TOKENS = [
    "<tool_call>",
    "</tool_call>",
    '<invoke name="',
    "</invoke>",
    '<parameter name="',
    "</parameter>",
    '">',
    "<tool_response>",
    "</tool_response>",
    "\\boxed{",
    "<think>",
    "</think>",
]
CHARACTERS = list(string.printable[:95]) + ["\n", "\t"]  # digits, letters, punctuation, space

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'tool' -%}"
    "<|tool|><tool_response>{{ message['content'] }}</tool_response><|end|>"
    "{%- elif message['role'] == 'assistant' -%}"
    "<|assistant|>{%- if enable_thinking is defined and enable_thinking is false -%}<think></think>{%- endif -%}"
    "{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{%- else -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>"
    "{%- if enable_thinking is defined and enable_thinking is false -%}<think></think>{%- endif -%}"
    "{%- endif -%}"
)


def _byte_level_alphabet() -> dict[str, str]:
    """GPT-2's byte -> printable-character map (what a ByteLevel pre-tokenizer emits)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(b): chr(c) for b, c in zip(keep, chars)}


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer; ids: specials, then tags, then characters."""
    alphabet = _byte_level_alphabet()
    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS + TAG_TOKENS + [alphabet[c] for c in CHARACTERS]:
        if tok not in vocab:
            vocab[tok] = len(vocab)
    # No merges: one token per character; added tokens are matched before this runs.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.add_tokens(TAG_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS.values()),
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
