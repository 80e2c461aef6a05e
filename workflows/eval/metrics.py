"""Scoring answers: normalisation, exact-match accuracy, word error rate, multiple-choice letters, word F1.

Pure functions on strings, no model. Two normalisations:

- :func:`normalize_answer` for short answers (exact match): lowercase, punctuation dropped, articles dropped, number
  words written as digits ("Two." == "2", "the Circle" == "circle", "twenty-one" == "21").
- :func:`normalize_transcript` for speech recognition (WER): the same without dropping articles, which are words the
  speaker said.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

ARTICLES = frozenset({"a", "an", "the"})
_UNITS: dict[str, int] = {
    w: i
    for i, w in enumerate(
        (
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
        )
    )
}
_TENS: dict[str, int] = {
    "twenty": 20,
    "thirty": 30,
    "forty": 40,
    "fifty": 50,
    "sixty": 60,
    "seventy": 70,
    "eighty": 80,
    "ninety": 90,
}
# A token: a number (with an optional decimal part) or a run of letters/digits with inner apostrophes ("don't").
_TOKEN = re.compile(r"\d+(?:\.\d+)?|[^\W_]+(?:'[^\W_]+)*")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens of ``text``; punctuation separates or disappears, "1,000" stays one number."""
    text = _THOUSANDS.sub("", text.translate(_QUOTES).lower())
    return _TOKEN.findall(text)


def numbers_to_digits(tokens: Sequence[str]) -> list[str]:
    """Number words as digits: ["twenty", "one", "cats"] -> ["21", "cats"]; ["seven"] -> ["7"] (0..99)."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in _TENS:
            value = _TENS[tok]
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            if nxt is not None and 1 <= _UNITS.get(nxt, 0) <= 9:
                value += _UNITS[nxt]
                i += 1
            out.append(str(value))
        elif tok in _UNITS:
            out.append(str(_UNITS[tok]))
        else:
            out.append(tok)
        i += 1
    return out


def normalize_answer(text: str) -> str:
    """The comparable form of a short answer: lowercase, no punctuation or articles, numbers as digits."""
    return " ".join(numbers_to_digits([t for t in tokenize(text) if t not in ARTICLES]))


def normalize_transcript(text: str) -> str:
    """The comparable form of a transcript: lowercase, no punctuation, numbers as digits (articles kept)."""
    return " ".join(numbers_to_digits(tokenize(text)))


def exact_match(prediction: str, reference: str) -> bool:
    """True when both normalise (:func:`normalize_answer`) to the same string."""
    return normalize_answer(prediction) == normalize_answer(reference)


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float | None:
    """Fraction of exact matches (0..1); None when there are no samples (not 0.0: nothing was measured).

    Raises:
        ValueError: the two sequences differ in length.
    """
    _same_length(predictions, references)
    if not references:
        return None
    return sum(exact_match(p, r) for p, r in zip(predictions, references, strict=True)) / len(references)


def edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance over tokens: the fewest substitutions, deletions and insertions from one to the other."""
    if len(reference) < len(hypothesis):
        reference, hypothesis = hypothesis, reference  # the distance is symmetric; keep the row short
    previous = list(range(len(hypothesis) + 1))
    for i, ref_tok in enumerate(reference, start=1):
        current = [i]
        for j, hyp_tok in enumerate(hypothesis, start=1):
            current.append(
                min(
                    previous[j] + 1,  # deletion
                    current[j - 1] + 1,  # insertion
                    previous[j - 1] + (ref_tok != hyp_tok),  # substitution (or match)
                )
            )
        previous = current
    return previous[-1]


def word_errors(
    reference: str, hypothesis: str, normalize: Callable[[str], str] = normalize_transcript
) -> tuple[int, int]:
    """(word edits, reference words) of one utterance after ``normalize``."""
    ref, hyp = normalize(reference).split(), normalize(hypothesis).split()
    return edit_distance(ref, hyp), len(ref)


def corpus_wer(
    references: Sequence[str], hypotheses: Sequence[str], normalize: Callable[[str], str] = normalize_transcript
) -> float | None:
    """Corpus word error rate: total word edits / total reference words (>= 0; above 1 with many insertions).

    Returns:
        None when there are no utterances.

    Raises:
        ValueError: the sequences differ in length, or the references hold no words at all (WER is undefined).
    """
    _same_length(hypotheses, references)
    if not references:
        return None
    edits = words = 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        e, n = word_errors(ref, hyp, normalize)
        edits += e
        words += n
    return wer_from_counts(edits, words)


def wer_from_counts(edits: int, words: int) -> float:
    """``edits / words``. Raises ValueError when ``words`` is 0 (references without words: WER is undefined)."""
    if words <= 0:
        raise ValueError(f"WER is undefined: the references hold {words} words (need at least 1)")
    return edits / words


def word_f1(prediction: str, reference: str) -> float:
    """Unigram F1 between normalised answers (a soft caption score): 1.0 when both are empty, 0.0 when one is."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


_LEADING_LETTER = re.compile(r"^\s*[(\[]?([A-Z])(?:[.):\]]|\s*$)")
# The phrase is matched in any case, the letter only in upper case ("the answer is a cat" names no option).
_ANSWER_PHRASE = re.compile(r"(?i:answer|option|choice)\s*(?i:is)?\s*[:\-]?\s*[(\[]?([A-Z])\b")
_LONE_LETTER = re.compile(r"(?<![\w'])([A-Z])(?![\w'])")


def extract_choice(text: str, options: Mapping[str, str]) -> str | None:
    """The option letter a free-form answer picks, or None when it picks none or is ambiguous.

    Tried in order: the answer is just a letter ("B", "(B)", "B. a cat"); a phrase ("The answer is B", "Option: C");
    the answer is an option's text, or contains exactly one option's text as whole words; exactly one distinct
    standalone capital letter among the options appears ("I think C").

    Args:
        text: the model's answer.
        options: letter -> option text, e.g. {"A": "a cat", "B": "a dog"}.
    """
    letters = set(options)
    match = _LEADING_LETTER.match(text)
    if match and match.group(1) in letters:
        return match.group(1)
    for match in _ANSWER_PHRASE.finditer(text):
        letter = match.group(1)
        if letter in letters:
            return letter
    norm = normalize_answer(text)
    if norm:
        by_text = {letter: normalize_answer(opt) for letter, opt in options.items()}
        equal = [letter for letter, opt in by_text.items() if opt and opt == norm]
        if len(equal) == 1:
            return equal[0]
        padded = f" {norm} "
        contained = [letter for letter, opt in by_text.items() if opt and f" {opt} " in padded]
        if len(contained) == 1:
            return contained[0]
    lone = {m for m in _LONE_LETTER.findall(text) if m in letters}
    if len(lone) == 1:
        return lone.pop()
    return None


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions for {len(b)} references: the lengths must be equal")
