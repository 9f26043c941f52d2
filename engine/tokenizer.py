"""An offline character-level tokenizer with the chat and tool-call tokens.

Nothing is downloaded: the vocabulary is printable ASCII plus newline and tab, the chat
role markers (special tokens) and a few multi-character tool-call/answer tags (added
tokens that decode as text). Each added tag is one token, so an XML tool call costs a
handful of tokens instead of ~80 characters; the tiny models learn the format quickly.
The result is a `PreTrainedTokenizerFast` saved in the standard Hugging Face layout, with
a Jinja chat template equal to `engine.chat.render` (tested).
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
    "{%- else -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer; ids: specials, then tags, then characters."""
    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS + TAG_TOKENS + CHARACTERS:
        if tok not in vocab:
            vocab[tok] = len(vocab)
    unk_free = models.WordLevel(vocab=vocab, unk_token=PAD)
    tok = Tokenizer(unk_free)
    # Split every character apart; added tokens are matched before this runs.
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
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
