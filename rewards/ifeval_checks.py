"""IFEval's instruction checkers, by IFEval's own ids and kwarg names (Zhou et al., 2023).

Each checker is `(response: str, **kwargs) -> bool` with the semantics of the reference
implementation (google-research `instruction_following_eval/instructions.py`).
Departures, all because nothing may be downloaded here (no nltk data, no langdetect):
- `length_constraints:number_sentences` counts sentences with IFEval's own regex
  splitter (`split_into_sentences`) instead of nltk's punkt model;
- `change_case:capital_word_frequency` tokenises with a Unicode regex (words, hyphenated
  words, clitics split off as Treebank does) instead of `nltk.word_tokenize`;
- `change_case:english_lowercase` / `english_capital` check the case only, not that the
  language is English; `language:response_language` is not implemented;
- keywords are matched literally (`re.escape`), where IFEval passes them as regexes;
- JSON too deep for the parser is "not followed" (IFEval's `json_format` raises).
Agreement with Google's checkers on 704 generated responses: docs/ifeval_parity.md.
Title, bullet lists, placeholders and postscript give IFEval's regex results by linear
scans (the regexes are quadratic on adversarial text).
"""

from __future__ import annotations

import collections
import json
import re
from typing import Callable

from engine.registry import Registry

Checker = Callable[..., bool]
CHECKERS: Registry[Checker] = Registry("ifeval instruction")
checker = CHECKERS.register  # @checker("instruction_id")
RELATIONS = ("less than", "at least")
_NON_SPACE_RE = re.compile(r"\S")


def _compare(count: int, threshold: int, relation: str) -> bool:
    if relation == "less than":
        return count < threshold
    if relation == "at least":
        return count >= threshold
    raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")


def split_into_sentences(text: str) -> list[str]:
    """IFEval's regex sentence splitter (instructions_util.split_into_sentences)."""
    alpha, digits = "([A-Za-z])", "([0-9])"
    prefixes, suffixes = "(Mr|St|Mrs|Ms|Dr)[.]", "(Inc|Ltd|Jr|Sr|Co)"
    starters = r"(Mr|Mrs|Ms|Dr|Prof|Capt|Cpt|Lt|He\s|She\s|It\s|They\s|Their\s|Our\s|We\s|But\s|However\s|That\s|This\s|Wherever)"
    acronyms, websites = "([A-Z][.][A-Z][.](?:[A-Z][.])?)", "[.](com|net|org|io|gov|edu|me)"
    text = (" " + text + "  ").replace("\n", " ")
    text = re.sub(prefixes, "\\1<prd>", text)
    text = re.sub(websites, "<prd>\\1", text)
    text = re.sub(digits + "[.]" + digits, "\\1<prd>\\2", text)
    text = re.sub(r"\.{2,}", lambda m: "<prd>" * len(m.group(0)) + "<stop>", text)
    text = text.replace("Ph.D.", "Ph<prd>D<prd>")
    text = re.sub(r"\s" + alpha + "[.] ", " \\1<prd> ", text)
    text = re.sub(acronyms + " " + starters, "\\1<stop> \\2", text)
    text = re.sub(alpha + "[.]" + alpha + "[.]" + alpha + "[.]", "\\1<prd>\\2<prd>\\3<prd>", text)
    text = re.sub(alpha + "[.]" + alpha + "[.]", "\\1<prd>\\2<prd>", text)
    text = re.sub(" " + suffixes + "[.] " + starters, " \\1<stop> \\2", text)
    text = re.sub(" " + suffixes + "[.]", " \\1<prd>", text)
    text = re.sub(" " + alpha + "[.]", " \\1<prd>", text)
    for a, b in ((".\u201d", "\u201d."), ('."', '".'), ('!"', '"!'), ('?"', '"?')):
        text = text.replace(a, b)
    for p in ".?!":
        text = text.replace(p, p + "<stop>")
    sentences = [s.strip() for s in text.replace("<prd>", ".").split("<stop>")]
    return [s for s in sentences if s]


def count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))


@checker("punctuation:no_comma")
def no_comma(response: str) -> bool:
    return "," not in response


@checker("length_constraints:number_words")
def number_words(response: str, num_words: int, relation: str) -> bool:
    return _compare(count_words(response), num_words, relation)


@checker("length_constraints:number_sentences")
def number_sentences(response: str, num_sentences: int, relation: str) -> bool:
    return _compare(len(split_into_sentences(response)), num_sentences, relation)


@checker("length_constraints:number_paragraphs")
def number_paragraphs(response: str, num_paragraphs: int) -> bool:
    """Exactly N paragraphs separated by `***`; an empty inner paragraph fails."""
    parts = re.split(r"\s?\*\*\*\s?", response)
    count = len(parts)
    for i, part in enumerate(parts):
        if not part.strip():
            if i in (0, len(parts) - 1):
                count -= 1
            else:
                return False
    return count == num_paragraphs


@checker("length_constraints:nth_paragraph_first_word")
def nth_paragraph_first_word(response: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    parts = re.split(r"\n\n", response)
    count = sum(1 for p in parts if p.strip())
    if nth_paragraph > count or not parts[nth_paragraph - 1].strip():
        return False
    word = parts[nth_paragraph - 1].strip().split()[0].lstrip("'").lstrip('"')
    first = ""
    for ch in word:
        if ch in {".", ",", "?", "!", "'", '"'}:
            break
        first += ch.lower()
    return count == num_paragraphs and first == first_word.lower()


@checker("keywords:existence")
def keywords_existence(response: str, keywords: list[str]) -> bool:
    return all(re.search(re.escape(k), response, flags=re.IGNORECASE) for k in keywords)


@checker("keywords:forbidden_words")
def forbidden_words(response: str, forbidden_words: list[str]) -> bool:
    return not any(re.search(r"\b" + re.escape(w) + r"\b", response, flags=re.IGNORECASE) for w in forbidden_words)


@checker("keywords:frequency")
def keyword_frequency(response: str, keyword: str, frequency: int, relation: str) -> bool:
    return _compare(len(re.findall(re.escape(keyword.strip()), response, flags=re.IGNORECASE)), frequency, relation)


@checker("keywords:letter_frequency")
def letter_frequency(response: str, letter: str, let_frequency: int, let_relation: str) -> bool:
    return _compare(collections.Counter(response.lower())[letter.lower()], let_frequency, let_relation)


@checker("detectable_format:json_format")
def json_format(response: str) -> bool:
    text = response.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):  # each in turn, as IFEval chains them
        text = text.removeprefix(prefix)
    text = text.removesuffix("```").strip()
    try:
        json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        return False
    return True


@checker("detectable_format:title")
def title(response: str) -> bool:
    """IFEval: some `re.findall(r"<<[^\\n]+>>")` match is non-empty once its `<`/`>` and
    spaces are stripped. In a line that regex matches at most once, from the first `<<`
    to the last `>>` at least one character later; found here with str.find/rfind per line
    (the regex rescans the line from every `<<`: quadratic, 40k `<`: 17 s)."""
    for line in response.split("\n"):
        end = line.rfind(">>")
        start = line.find("<<")
        if start != -1 and end >= start + 3 and line[start:end + 2].lstrip("<").rstrip(">").strip():
            return True
    return False


def _count_line_starts(text: str, marker: Callable[[str, int], int | None]) -> int:
    """How many matches `re.findall(r"(?m)^\\s*MARKER.*$", text)` finds, in linear time.

    From a line start, `\\s*` runs (across newlines) to the first non-space `q`; the
    match needs MARKER at `q` (`marker(text, q)` returns where `.*$` starts, or None) and
    ends at the end of that line; the search then resumes there, else at the next line
    start. The regex rescans the whitespace run from every line start in it (quadratic:
    20k newlines, 7.5 s); here each run's end is looked up once."""
    n, count, pos, q = len(text), 0, 0, -1
    while pos < n:
        if pos and text[pos - 1] != "\n":
            nl = text.find("\n", pos)
            if nl == -1:
                break
            pos = nl + 1
        if pos > q:  # else pos is inside the last whitespace run, which still ends at q
            m = _NON_SPACE_RE.search(text, pos)
            q = m.start() if m else n
        rest = marker(text, q) if q < n else None
        if rest is None:
            pos += 1
            continue
        count += 1
        nl = text.find("\n", rest)
        pos = n if nl == -1 else nl
    return count


def _star_bullet(text: str, q: int) -> int | None:  # `\*[^\*]`
    return q + 2 if text[q] == "*" and q + 1 < len(text) and text[q + 1] != "*" else None


def _dash_bullet(text: str, q: int) -> int | None:  # `-`
    return q + 1 if text[q] == "-" else None


@checker("detectable_format:number_bullet_lists")
def number_bullet_lists(response: str, num_bullets: int) -> bool:
    """IFEval's `^\\s*\\*[^\\*].*$` and `^\\s*-.*$` match counts (`_count_line_starts`)."""
    stars = _count_line_starts(response, _star_bullet)
    dashes = _count_line_starts(response, _dash_bullet)
    return stars + dashes == num_bullets


@checker("detectable_format:number_highlighted_sections")
def number_highlighted_sections(response: str, num_highlights: int) -> bool:
    n = sum(1 for h in re.findall(r"\*[^\n\*]*\*", response) if h.strip("*").strip())
    n += sum(1 for h in re.findall(r"\*\*[^\n\*]*\*\*", response) if h[2:-2].strip())
    return n >= num_highlights


@checker("detectable_format:multiple_sections")
def multiple_sections(response: str, section_spliter: str, num_sections: int) -> bool:
    sections = re.split(r"\s?" + re.escape(section_spliter.strip()) + r"\s?\d+\s?", response)
    return len(sections) - 1 >= num_sections


@checker("detectable_format:constrained_response")
def constrained_response(response: str) -> bool:
    options = ("My answer is yes.", "My answer is no.", "My answer is maybe.")
    return any(o in response.strip() for o in options)


@checker("detectable_content:postscript")
def postscript(response: str, postscript_marker: str) -> bool:
    """IFEval: `re.findall(r"\\s*MARKER.*$", response.lower(), re.MULTILINE)` is non-empty,
    which is exactly "MARKER occurs": the `\\s*` may match nothing and `.*$` always
    matches. Searched without them, as the leading `\\s*` made the regex quadratic (every
    space rescans the run after it: 20k spaces, 3 s)."""
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"p\.\s?p\.\s?s"
    elif marker == "P.S.":
        pattern = r"p\.\s?s\."
    else:
        return marker.lower() in response.lower()
    return re.search(pattern, response.lower()) is not None


@checker("detectable_content:number_placeholders")
def number_placeholders(response: str, num_placeholders: int) -> bool:
    """IFEval's `re.findall(r"\\[.*?\\]")` count: per line, from the first `[` to the next
    `]`, then on after it; counted with str.find (the regex rescans the line from every
    unclosed `[`: quadratic, 20k `[`: 85 s)."""
    count = 0
    for line in response.split("\n"):
        pos = 0
        while (start := line.find("[", pos)) != -1 and (end := line.find("]", start + 1)) != -1:
            count += 1
            pos = end + 1
    return count >= num_placeholders


@checker("change_case:english_lowercase")
def english_lowercase(response: str) -> bool:
    return response.islower()


@checker("change_case:english_capital")
def english_capital(response: str) -> bool:
    return response.isupper()


# nltk's Treebank tokenizer splits at spaces and at these marks; `-`, `.`, `=`, `/`, `'` inside a word do not split it
_SPLIT_RE = re.compile(r"--+|[\s,;:@#$%&?!*()\[\]{}<>\"`\u201c\u201d\u2018\u2019\u00ab\u00bb\u2014\u2013\u2026]")
_CLITIC_RE = re.compile(r"(?i)(?:n't|'s|'m|'d|'ll|'re|'ve)$")  # split off as a token of its own, as Treebank does


def count_capital_words(text: str) -> int:
    """Words in all capitals, as IFEval counts them: tokens of `nltk.word_tokenize` for
    which `str.isupper()` holds (any script: Cyrillic, Greek, fullwidth, accented). Here
    the tokens are the pieces between spaces and Treebank's splitting marks, with a
    clitic such as `N'T` / `'S` a token of its own; an ASCII-only word regex missed
    fullwidth and Cyrillic capitals. Checked against nltk's tokenizer in
    tests/unit/test_ifeval_parity.py."""
    count = 0
    for word in _SPLIT_RE.split(text):
        word = word.strip("'")
        parts = []
        while (m := _CLITIC_RE.search(word)) and m.start() > 0:
            parts.append(word[m.start():])
            word = word[:m.start()]
        count += sum(1 for p in [word, *parts] if p.isupper())
    return count


@checker("change_case:capital_word_frequency")
def capital_word_frequency(response: str, capital_frequency: int, capital_relation: str) -> bool:
    return _compare(count_capital_words(response), capital_frequency, capital_relation)


@checker("startend:quotation")
def quotation(response: str) -> bool:
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


@checker("startend:end_checker")
def end_checker(response: str, end_phrase: str) -> bool:
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


@checker("combination:two_responses")
def two_responses(response: str) -> bool:
    valid = []
    parts = response.split("******")
    for i, part in enumerate(parts):
        if not part.strip():
            if i not in (0, len(parts) - 1):
                return False
        else:
            valid.append(part)
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


@checker("combination:repeat_prompt")
def repeat_prompt(response: str, prompt_to_repeat: str) -> bool:
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())
