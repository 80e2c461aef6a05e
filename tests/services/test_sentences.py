"""Incremental sentence splitting: English, Chinese, mixed, numbers, abbreviations, and independence of chunking."""

from __future__ import annotations

import random

import pytest

from services.text.sentences import SentenceSplitter, split_sentences

CASES = [
    ("Hello world. How are you? I am fine!", ["Hello world.", "How are you?", "I am fine!"]),
    ("Pi is about 3.14. The rest is 0.00159!", ["Pi is about 3.14.", "The rest is 0.00159!"]),
    ("Mr. Smith met Dr. Jones at 5 p.m. today.", ["Mr. Smith met Dr. Jones at 5 p.m. today."]),
    ("Use tools, e.g. a hammer. Or not.", ["Use tools, e.g. a hammer.", "Or not."]),
    ("J. K. Rowling wrote it. So do I. Yes.", ["J. K. Rowling wrote it.", "So do I.", "Yes."]),
    ("Well... maybe not. Wait... What?! Really…", ["Well... maybe not.", "Wait...", "What?!", "Really…"]),
    ("First; second. Third", ["First;", "second.", "Third"]),
    ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
    ("Visit example.com or v2.0.1 now. Done", ["Visit example.com or v2.0.1 now.", "Done"]),
    ("你好。我是Ola！你呢？好的", ["你好。", "我是Ola！", "你呢？", "好的"]),
    ("他说：“好。”然后走了；我留下。", ["他说：“好。”", "然后走了；", "我留下。"]),
    ("价格是3.5元。对吗？", ["价格是3.5元。", "对吗？"]),
    ("Hello.你好。OK! 再见", ["Hello.", "你好。", "OK!", "再见"]),
    (
        "1. First item\n2. Second item\n\nA new paragraph. End",
        ["1. First item", "2. Second item", "A new paragraph.", "End"],
    ),
    ("The answer is 2. Then 3.", ["The answer is 2.", "Then 3."]),
    ("Title\n---\nBody.", ["Title", "---\nBody."]),
    ("   \n\n  ", []),
    ("", []),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_split(text, expected):
    assert split_sentences(text) == expected


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_character_by_character_gives_the_same(text, expected):
    assert split_sentences(list(text)) == expected


def test_random_chunkings_never_change_the_result():
    rng = random.Random(0)
    corpus = [text for text, _ in CASES] + [
        "Dr. Who? No. The U.S. economy grew 2.5% in Q3... analysts were surprised. 然而，中国的增长是5.2%。Why?!",
        'She asked, "Is it 3.14?" He said: "No… it\'s π." OK.\nNext line; more.\n\n新段落！结束。',
    ]
    for text in corpus:
        for min_chars, max_chars in ((1, None), (12, None), (1, 25), (8, 40)):
            want = split_sentences(text, min_chars, max_chars)
            for _ in range(60):
                cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12)))) if text else []
                pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
                assert split_sentences(pieces, min_chars, max_chars) == want, (text, pieces)


def test_sentences_keep_every_non_space_character_in_order():
    text = CASES[0][0] + " 你好。" + CASES[2][0] + "\n" + CASES[5][0]
    for min_chars in (1, 10, 30):
        joined = "".join(split_sentences(text, min_chars=min_chars))
        assert joined.replace(" ", "").replace("\n", "") == text.replace(" ", "").replace("\n", "")


def test_sentences_come_out_as_soon_as_they_are_decidable():
    sp = SentenceSplitter()
    assert sp.feed("Hello world.") == []  # "." could be "3.14" or "Mr." followed by more
    assert sp.feed(" ") == []  # the next word could start lowercase ("... e.g. this")
    assert sp.feed("How") == ["Hello world."]
    assert sp.feed(" are you?") == []
    assert sp.feed(" Fine") == ["How are you?"]
    assert sp.feed("好。") == []  # a closing quote could follow
    assert sp.feed("下") == ["Fine好。"]
    assert sp.flush() == ["下"]
    assert sp.flush() == []
    with pytest.raises(RuntimeError, match="after flush"):
        sp.feed("more")


def test_min_chars_merges_short_fragments():
    assert split_sentences("Hi. How are you doing today? OK. Bye now.", min_chars=8) == [
        "Hi. How are you doing today?",
        "OK. Bye now.",
    ]
    assert split_sentences("好。你好吗？", min_chars=3) == ["好。你好吗？"]
    assert split_sentences("A long enough sentence. Hi.", min_chars=8) == ["A long enough sentence.", "Hi."]  # last


def test_max_chars_cuts_run_on_sentences_at_soft_breaks():
    text = "one, two, three, four, five, six, seven, eight, nine, ten."
    out = split_sentences(text, max_chars=20)
    assert all(len(s) <= 20 for s in out)
    assert out[0] == "one, two, three,"
    assert " ".join(out) == text
    assert split_sentences("x" * 25, max_chars=10) == ["x" * 10, "x" * 10, "x" * 5]


def test_bad_options():
    with pytest.raises(ValueError, match="min_chars"):
        SentenceSplitter(min_chars=-1)
    with pytest.raises(ValueError, match="max_chars"):
        SentenceSplitter(min_chars=10, max_chars=5)
