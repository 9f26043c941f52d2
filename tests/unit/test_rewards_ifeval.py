"""Every ifeval instruction type: one response that follows it, one near-miss that does not."""

import pytest

from rewards import get_verifier
from rewards.ifeval_checks import CHECKERS, split_into_sentences

# (instruction id, kwargs, follows, near-miss)
CASES = [
    ("punctuation:no_comma", {}, "Red and blue.", "Red, blue."),
    ("length_constraints:number_words", {"num_words": 4, "relation": "at least"}, "one two three four", "one two three"),
    ("length_constraints:number_words", {"num_words": 4, "relation": "less than"}, "one two three", "one two three four"),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at least"}, "Hi there. Dr. Who came!", "Hi Dr. Who."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "A\n***\nB", "A\n***\n***\nB"),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "First.\n\n\"Then, done.", "First.\n\nNext done."),
    ("keywords:existence", {"keywords": ["cat", "dog"]}, "A Cat and a dog.", "A cat only."),
    ("keywords:forbidden_words", {"forbidden_words": ["cat"]}, "A category.", "One Cat."),
    ("keywords:frequency", {"keyword": "ha", "frequency": 3, "relation": "at least"}, "ha ha HA", "ha ha"),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "less than"}, "Zoo", "Zoo Zed"),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', '{"a": 1,}'),
    ("detectable_format:title", {}, "<<My Poem>>\nroses", "<< >> roses"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n- two", "* one\n* two\n* three"),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*a* and **b**", "*a* and * *"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nx\nSection 2\ny", "Section 1\nx\nSection two"),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "My answer is yes"),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\np.s. bye", "Hi. PS bye"),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "At [address] on [date]", "At [address] on date"),
    ("change_case:english_lowercase", {}, "all lower case 1.", "all lower Case"),
    ("change_case:english_capital", {}, "ALL CAPS 1.", "ALL CAPs"),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"}, "NASA and ESA fly", "NASA and Esa fly"),
    ("startend:quotation", {}, ' "quoted" ', '"quoted'),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, 'Done. any other questions?"', "Any other questions? No."),
    ("combination:two_responses", {}, "first******second", "same******same"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "say hi. Hi!", "Hi! Say hi."),
]


def test_at_least_twenty_types_all_covered():
    assert len(CHECKERS) >= 20
    assert {c[0] for c in CASES} == set(CHECKERS)


@pytest.mark.parametrize("iid, kwargs, good, bad", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_instruction_follows_and_near_miss(iid, kwargs, good, bad):
    ifeval = get_verifier("ifeval")
    ref = {"instruction_id_list": [iid], "kwargs": [kwargs]}
    assert ifeval(good, ref).score == 1.0, ifeval(good, ref).info
    res = ifeval(bad, ref)
    assert res.score == 0.0 and iid in res.info["reason"]


def test_sentence_splitter_keeps_abbreviations():
    # "Dr." and "3.5" do not end sentences; "!" does.
    assert split_into_sentences("Dr. Smith paid 3.5 dollars. Wow!") == ["Dr. Smith paid 3.5 dollars.", "Wow!"]


def test_strict_vs_loose_and_prompt_level():
    ifeval = get_verifier("ifeval")
    # The lowercase rule fails strictly because of the first line; loose drops the first line.
    # The keyword rule is followed either way.
    text = "Sure, Here It Is\nall lower case here"
    ref = {"instruction_id_list": ["change_case:english_lowercase", "keywords:existence"],
           "kwargs": [{}, {"keywords": ["lower"]}]}
    res = ifeval(text, ref)
    assert res.score == 0.5  # strict instruction-level: 1 of 2
    assert res.info["strict_prompt"] == 0.0
    assert res.info["loose_instruction"] == 1.0 and res.info["loose_prompt"] == 1.0
    assert ifeval(text, ref, mode="loose_prompt").score == 1.0


def test_loose_removes_asterisks():
    # "**Title**" markdown breaks the end phrase check strictly, not loosely.
    ref = {"instruction_id_list": ["startend:end_checker"], "kwargs": [{"end_phrase": "The end."}]}
    res = get_verifier("ifeval")("Story.\n**The end.**", ref)
    assert res.score == 0.0 and res.info["loose_instruction"] == 1.0


def test_hf_rows_with_null_kwargs_score_unconverted():
    ref = {"instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
           "kwargs": [{"num_words": None, "relation": None}, {"num_words": 3, "relation": "at least", "keyword": None}]}
    assert get_verifier("ifeval")("one two three", ref).score == 1.0


def test_empty_response_follows_nothing():
    ref = {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    assert get_verifier("ifeval")("   ", ref).score == 0.0


def test_bad_reference_errors_name_the_problem():
    ifeval = get_verifier("ifeval")
    with pytest.raises(ValueError, match="unknown ifeval instruction 'nope:x'"):
        ifeval("x", {"instruction_id_list": ["nope:x"], "kwargs": [{}]})
    with pytest.raises(ValueError, match="bad kwargs"):
        ifeval("x", {"instruction_id_list": ["length_constraints:number_words"], "kwargs": [{"words": 3}]})
    with pytest.raises(ValueError, match="relation must be"):
        ifeval("x", {"instruction_id_list": ["length_constraints:number_words"], "kwargs": [{"num_words": 3, "relation": "about"}]})


def test_linear_checkers_agree_with_ifeval_regexes_on_random_text():
    """title, number_bullet_lists, number_placeholders and postscript are linear scans
    (the IFEval regexes are quadratic on adversarial text); on 20k random strings over
    the characters those regexes care about, they give IFEval's answers exactly."""
    import random
    import re

    from rewards import ifeval_checks as C

    rng = random.Random(0)
    pieces = ["*", "**", "-", " ", "\t", "\n", "a", "<", ">", "<<", ">>", "[", "]", "p", ".", "s", "p.s.",
              "P. P. S", "\u2003"]
    for _ in range(20_000):
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 20)))
        bullets = len(re.findall(r"^\s*\*[^\*].*$", s, flags=re.MULTILINE)) \
            + len(re.findall(r"^\s*-.*$", s, flags=re.MULTILINE))
        assert all(C.number_bullet_lists(s, k) == (bullets == k) for k in range(5)), repr(s)
        titles = re.findall(r"<<[^\n]+>>", s)
        assert C.title(s) == any(t.lstrip("<").rstrip(">").strip() for t in titles), repr(s)
        holders = len(re.findall(r"\[.*?\]", s))
        assert all(C.number_placeholders(s, k) == (holders >= k) for k in range(4)), repr(s)
        for marker, pattern in (("P.S.", r"\s*p\.\s?s\..*$"), ("P.P.S", r"\s*p\.\s?p\.\s?s.*$"),
                                ("ps", r"\s*ps.*$")):
            assert C.postscript(s, marker) == bool(re.findall(pattern, s.lower(), flags=re.MULTILINE)), (s, marker)


def test_deep_json_answer_is_not_followed_rather_than_an_error():
    deep = "[" * 100_000 + "]" * 100_000
    ref = {"instruction_id_list": ["detectable_format:json_format"], "kwargs": [{}]}
    res = get_verifier("ifeval")(deep, ref)
    assert res.score == 0.0 and res.info["followed_loose"] == {"detectable_format:json_format": False}
    assert get_verifier("ifeval")("[" * 500 + "]" * 500, ref).score == 1.0
