"""Scoring functions of ``workflows.eval.metrics``: normalisation, exact match, WER, option letters, word F1."""

from __future__ import annotations

import math

import pytest

from workflows.eval.metrics import (
    accuracy,
    corpus_wer,
    edit_distance,
    exact_match,
    extract_choice,
    normalize_answer,
    normalize_transcript,
    numbers_to_digits,
    tokenize,
    wer_from_counts,
    word_errors,
    word_f1,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two.", "2"),
        ("  the Red CIRCLE!  ", "red circle"),
        ("An apple", "apple"),
        ("twenty-one", "21"),
        ("Twenty one cats", "21 cats"),
        ("ninety", "90"),
        ("thirteen, 14", "13 14"),
        ("1,000 stars", "1000 stars"),
        ("3.5", "3.5"),
        ("Don’t stop", "don't stop"),
        ("a", ""),
        ("", ""),
        ("?!...", ""),
        ("left_right", "left right"),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_transcripts_keep_articles_and_write_numbers_as_digits() -> None:
    assert normalize_transcript("The number is SEVEN.") == "the number is 7"
    assert normalize_transcript("HE SAID: 'A CAT'") == "he said a cat"


def test_number_words_only_combine_tens_with_units() -> None:
    assert numbers_to_digits(["twenty", "zero"]) == ["20", "0"]  # "twenty zero" is not 20
    assert numbers_to_digits(["one", "twenty"]) == ["1", "20"]
    assert numbers_to_digits(["twenty"]) == ["20"]
    assert numbers_to_digits([]) == []
    assert tokenize("Hello, World") == ["hello", "world"]


def test_exact_match_and_accuracy() -> None:
    assert exact_match("Two", "2")
    assert exact_match("The circle.", "circle")
    assert not exact_match("two circles", "2")
    assert accuracy(["2", "blue", "x"], ["two", "Blue", "y"]) == pytest.approx(2 / 3)
    assert accuracy([], []) is None  # nothing measured is not 0.0
    with pytest.raises(ValueError, match="lengths must be equal"):
        accuracy(["a"], [])


@pytest.mark.parametrize(
    ("ref", "hyp", "distance"),
    [
        ([], [], 0),
        ([], ["a", "b"], 2),  # insertions
        (["a", "b", "c"], [], 3),  # deletions
        (["a", "b", "c"], ["a", "x", "c"], 1),  # substitution
        (["a", "b", "c"], ["a", "c"], 1),
        (["a", "b"], ["b", "a"], 2),
        (["kitten"], ["kitten"], 0),
        (list("kitten"), list("sitting"), 3),
    ],
)
def test_edit_distance(ref: list[str], hyp: list[str], distance: int) -> None:
    assert edit_distance(ref, hyp) == distance
    assert edit_distance(hyp, ref) == distance


def test_corpus_wer_is_total_edits_over_total_reference_words() -> None:
    refs = ["the cat sat", "a b c d e f g h i j"]
    hyps = ["the dog sat", "a b c d e f g h i j"]
    # 1 edit over 3 + 10 words; the mean of per-utterance rates would be (1/3 + 0) / 2.
    assert corpus_wer(refs, hyps) == pytest.approx(1 / 13)
    assert word_errors("the cat sat", "the dog sat") == (1, 3)
    assert corpus_wer(["seven cats"], ["7 CATS!"]) == 0.0  # normalised before counting
    assert corpus_wer(["hi"], ["hi there you all"]) == pytest.approx(3.0)  # insertions push WER above 1
    assert corpus_wer([], []) is None
    with pytest.raises(ValueError, match="undefined"):
        corpus_wer(["..."], ["x"])  # references with no words at all
    with pytest.raises(ValueError, match="undefined"):
        wer_from_counts(0, 0)
    assert math.isclose(wer_from_counts(3, 4), 0.75)


def test_word_f1() -> None:
    assert word_f1("two red circles", "two red circles") == 1.0
    assert word_f1("red circles", "two red circles") == pytest.approx(2 * (1.0 * 2 / 3) / (1.0 + 2 / 3))
    assert word_f1("", "") == 1.0
    assert word_f1("", "x") == 0.0
    assert word_f1("blue", "red") == 0.0


OPTIONS = {"A": "a cat", "B": "a dog", "C": "two birds", "D": "nothing"}


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        ("B", "B"),
        ("(C)", "C"),
        ("D. nothing", "D"),
        ("A:", "A"),
        ("The answer is C.", "C"),
        ("answer: (B)", "B"),
        ("Option D", "D"),
        ("a dog", "B"),
        ("I see a dog here", "B"),
        ("2 birds", "C"),  # option text, numbers normalised
        ("I think it is B, clearly", "B"),
        ("A dog", "B"),  # a leading article is not option A
        ("the answer is a cat", "A"),  # lower-case "a" is no letter; the text names option A
        ("", None),
        ("no idea", None),
        ("A or B", None),  # ambiguous
        ("E", None),  # not an option
    ],
)
def test_extract_choice(answer: str, letter: str | None) -> None:
    assert extract_choice(answer, OPTIONS) == letter
