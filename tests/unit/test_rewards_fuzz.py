"""A failure the model's output causes is a score of 0, never an exception (which the
scoring worker would report as a "verifier error", and a batch of those stops a stage):
random text built from every verifier's syntax, fed to math, ifeval (all 24 instruction
types at once), tool and format."""

from __future__ import annotations

import random

from rewards import get_verifier

PIECES = ["\\boxed{", "\\fbox {", "{", "}", "(", ")", "[", "]", "\\frac{1}{2}", "the answer is ", "final answer:",
          "1,234", "-0.5", "3/4", "$", "\n", "\n\n", " ", "*", "**", "***", "******", "-", "<<", ">>", "P.S.",
          "p. p. s", "SECTION 1", '"', "```json", '{"a": ', "[[[[", "]]]]", "<think>", "</think>", "<answer>",
          "</answer>", "<tool_call>", "</tool_call>", '<invoke name="add">', "</invoke>", '<parameter name="a">',
          "</parameter>", "<tool_response>", "</tool_response>", "\x00", "\ud800", "é", "Z", "word", "My answer is yes."]
IFEVAL_REF = {
    "instruction_id_list": [
        "punctuation:no_comma", "length_constraints:number_words", "length_constraints:number_sentences",
        "length_constraints:number_paragraphs", "length_constraints:nth_paragraph_first_word", "keywords:existence",
        "keywords:forbidden_words", "keywords:frequency", "keywords:letter_frequency", "detectable_format:json_format",
        "detectable_format:title", "detectable_format:number_bullet_lists",
        "detectable_format:number_highlighted_sections", "detectable_format:multiple_sections",
        "detectable_format:constrained_response", "detectable_content:postscript",
        "detectable_content:number_placeholders", "change_case:english_lowercase", "change_case:english_capital",
        "change_case:capital_word_frequency", "startend:quotation", "startend:end_checker",
        "combination:two_responses", "combination:repeat_prompt"],
    "kwargs": [
        {}, {"num_words": 5, "relation": "less than"}, {"num_sentences": 2, "relation": "at least"},
        {"num_paragraphs": 2}, {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "word"},
        {"keywords": ["word", "a.b"]}, {"forbidden_words": ["word"]}, {"keyword": "Z", "frequency": 2, "relation": "at least"},
        {"letter": "z", "let_frequency": 2, "let_relation": "less than"}, {}, {}, {"num_bullets": 2},
        {"num_highlights": 1}, {"section_spliter": "SECTION", "num_sections": 1}, {}, {"postscript_marker": "P.S."},
        {"num_placeholders": 1}, {}, {}, {"capital_frequency": 2, "capital_relation": "at least"}, {},
        {"end_phrase": "yes."}, {}, {"prompt_to_repeat": "word word"}],
}
REFERENCES = {
    "math": {"answer": "\\frac{1}{2}"},
    "ifeval": IFEVAL_REF,
    "tool": {"calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}], "answer": "3",
             "tools": [{"name": "add", "parameters": {"type": "object", "required": ["a", "b"],
                                                      "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}]},
    "format": {},
}


def test_random_model_output_never_raises():
    rng = random.Random(0)
    for name, ref in REFERENCES.items():
        verifier = get_verifier(name)
        for _ in range(300 if name == "math" else 800):
            text = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 40)))
            result = verifier(text, ref)  # raises: the test fails, naming the text
            assert 0.0 <= result.score <= 1.0 and (result.score > 0 or name == "format" or result.info.get("reason")), \
                (name, text, result)
