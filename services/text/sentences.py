"""Incremental sentence splitting of streamed text (English and Chinese), to speak an answer while it is generated.

Feed the LLM's text deltas as they come; each call returns the sentences completed so far. The result depends only
on the text, never on how it was cut into deltas: a boundary is decided only once every character the decision
looks at has arrived, so a delta boundary inside ``"3.14"``, ``"Mr. Smith"`` or ``"好。”"`` changes nothing.

Where a sentence ends:
- after ``.`` ``!`` ``?`` ``;`` or an ellipsis (``...``, ``…``), with any closing quotes or brackets after them,
  when whitespace, a CJK character or the end of the text follows. So decimals (``3.14``), versions and URLs do not
  split;
- after a Chinese (full-width) ``。`` ``！`` ``？`` ``；`` (with closing quotes / brackets), whatever follows;
- at every newline (lines of LLM output are list items, headings or paragraphs).

Where it does not (a ``.`` or an ellipsis only):
- after a common abbreviation (``Mr.``, ``Dr.``, ``e.g.``, ``vs.``, ...), a single-letter initial (``J. K.``), a
  dotted acronym (``U.S.``, ``p.m.``) or a list number at the start of a sentence (``1. First``). A sentence that
  really ends with one of these (``... in the U.S. Then``) is merged with the next: a deliberate trade-off;
- when the next word starts with a lowercase letter (``Well... maybe``, ``approx. ten``).

Sentences shorter than ``min_chars``, or without a letter or digit (``---``), are held and merged with the
following one. ``max_chars`` (optional) bounds
the wait for a long run-on sentence: at that length it is cut after its last comma-like mark, else its last space.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

ASCII_TERMINATORS = frozenset(".!?;…")
CJK_TERMINATORS = frozenset("。！？；")
CLOSERS = frozenset("\"')]}»”’」』）】》")
SOFT_BREAKS = frozenset(",，、:：")
# Lowercase, without the final dot. Words that often end a sentence ("etc.", "no.", "Inc.") are left out on purpose.
ABBREVIATIONS = frozenset(
    {
        "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "e.g", "i.e", "cf", "fig", "figs", "approx",
        "dept", "gen", "gov", "lt", "col", "sgt", "capt", "rev", "hon", "jan", "feb", "mar", "apr", "jun", "jul",
        "aug", "sep", "sept", "oct", "nov", "dec", "vol", "pp", "ch", "ca", "al",
    }
)  # fmt: skip
_DOTTED = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]")  # U.S / e.g / p.m (the final dot is the one being judged)
_INITIAL = re.compile(r"[A-HJ-Z]")  # J. K. Rowling ("I." ends sentences: "So do I.")
_OPENERS = "\"'([{«“‘「『（【《"


def _is_cjk(c: str) -> bool:
    """CJK ideographs, punctuation, kana and full-width forms: scripts written without spaces."""
    o = ord(c)
    return (
        0x3000 <= o <= 0x30FF  # CJK punctuation, kana
        or 0x3400 <= o <= 0x4DBF  # extension A
        or 0x4E00 <= o <= 0x9FFF  # unified ideographs
        or 0xF900 <= o <= 0xFAFF  # compatibility ideographs
        or 0xFF00 <= o <= 0xFFEF  # full-width forms
        or 0x20000 <= o <= 0x3134F  # extensions B-G
    )


class SentenceSplitter:
    """Cuts streamed text into sentences. ``feed`` deltas, then ``flush`` once at the end of the stream.

    Args:
        min_chars: sentences with fewer characters (whitespace excluded at the ends) are merged with the next one;
            the last sentence of the stream is returned by ``flush`` whatever its length.
        max_chars: if set, a sentence reaching this many characters without an end is cut early (after its last
            ``,`` ``，`` ``、`` ``:`` ``：``, else its last whitespace, else at ``max_chars``).

    Sentences come back stripped of surrounding whitespace; empty ones (blank lines) are dropped.
    """

    def __init__(self, min_chars: int = 1, max_chars: int | None = None) -> None:
        if min_chars < 0:
            raise ValueError(f"min_chars must be >= 0, got {min_chars}")
        if max_chars is not None and max_chars < max(2, min_chars):
            raise ValueError(f"max_chars must be >= max(2, min_chars={min_chars}), got {max_chars}")
        self.min_chars = min_chars
        self.max_chars = max_chars
        self._buf = ""  # text of the current sentence onwards, not yet emitted
        self._pos = 0  # _buf[:_pos] is decided: no boundary inside it
        self._held = ""  # completed sentences (raw) shorter than min_chars, waiting to be merged
        self._done = False

    def feed(self, delta: str) -> list[str]:
        """Add a piece of text; returns the sentences it completed (possibly none)."""
        if self._done:
            raise RuntimeError("feed() after flush(); make a new SentenceSplitter per stream")
        self._buf += delta
        return self._scan(final=False)

    def flush(self) -> list[str]:
        """End of the stream: returns the remaining sentences (at most one after merging; none if only whitespace)."""
        if self._done:
            return []
        out = self._scan(final=True)
        rest = (self._held + self._buf).strip()
        self._held, self._buf, self._pos, self._done = "", "", 0, True
        if rest:
            out.append(rest)
        return out

    # ------------------------------------------------------------------------------------------------ internals
    def _scan(self, final: bool) -> list[str]:
        out: list[str] = []
        buf, i = self._buf, self._pos
        while i < len(buf):
            if self.max_chars is not None and i >= self.max_chars:
                cut = self._soft_cut(buf[: self.max_chars])
                self._emit(buf[:cut], out)
                buf, i = buf[cut:], 0
                continue
            c = buf[i]
            if c == "\n":
                self._emit(buf[: i + 1], out)
                buf, i = buf[i + 1 :], 0
                continue
            if c not in ASCII_TERMINATORS and c not in CJK_TERMINATORS:
                i += 1
                continue
            end = self._boundary(buf, i, final)
            if end is None:  # undecidable until more text arrives
                break
            if end < 0:  # decided: not a boundary; skip the whole punctuation run
                i = -end
                continue
            self._emit(buf[:end], out)
            buf, i = buf[end:], 0
        self._buf, self._pos = buf, i
        return out

    def _boundary(self, buf: str, i: int, final: bool) -> int | None:
        """Judge the punctuation run starting at ``buf[i]``.

        Returns the end index of the sentence (> 0) if it is a boundary, ``-j`` (j = index after the run) if not,
        or None if the text needed to decide has not arrived yet.
        """
        j = i
        while j < len(buf) and (buf[j] in ASCII_TERMINATORS or buf[j] in CJK_TERMINATORS):
            j += 1
        while j < len(buf) and buf[j] in CLOSERS:
            j += 1
        if j == len(buf) and not final:
            return None  # the run or its closers may go on
        run = buf[i:j].rstrip("".join(CLOSERS))
        if any(ch in CJK_TERMINATORS for ch in run):
            return j
        nxt = buf[j] if j < len(buf) else None
        if nxt is None or _is_cjk(nxt) or nxt == "\n":
            return j
        if not nxt.isspace():
            return -j  # 3.14, example.com, e.g.x
        if "!" in run or "?" in run or ";" in run:
            return j
        # A "." or an ellipsis followed by whitespace: look at the word before and the word after.
        is_ellipsis = "…" in run or run.count(".") >= 2
        if not is_ellipsis and self._dot_is_not_an_end(buf[:i]):
            return -j
        k = j
        while k < len(buf) and buf[k].isspace() and buf[k] != "\n":
            k += 1
        if k == len(buf):
            return j if final else None
        if buf[k].islower():
            return -j  # "Well... maybe", "approx. ten"
        return j

    @staticmethod
    def _dot_is_not_an_end(before: str) -> bool:
        """True if a "." right after ``before`` marks an abbreviation, an initial or a list number."""
        words = before.split()
        if not words:
            return False
        word = words[-1].lstrip(_OPENERS)
        if word.lower() in ABBREVIATIONS or _DOTTED.fullmatch(word) or _INITIAL.fullmatch(word):
            return True
        return word.isdigit() and len(words) == 1  # "1. First" at the start of a sentence

    def _emit(self, raw: str, out: list[str]) -> None:
        text = self._held + raw
        stripped = text.strip()
        if len(stripped) >= max(self.min_chars, 1) and any(ch.isalnum() for ch in stripped):
            out.append(stripped)
            self._held = ""
        else:  # too short, or nothing to say ("---", "."): merge with the next sentence
            self._held = text if stripped else ""

    @staticmethod
    def _soft_cut(head: str) -> int:
        for chars in (SOFT_BREAKS, None):
            for k in range(len(head) - 1, 0, -1):
                if (head[k] in chars) if chars is not None else head[k].isspace():
                    return k + 1
        return len(head)


def split_sentences(text: str | Iterable[str], min_chars: int = 1, max_chars: int | None = None) -> list[str]:
    """All sentences of a text, or of an iterable of deltas (same rules as ``SentenceSplitter``)."""
    splitter = SentenceSplitter(min_chars=min_chars, max_chars=max_chars)
    out: list[str] = []
    for delta in [text] if isinstance(text, str) else text:
        out += splitter.feed(delta)
    return out + splitter.flush()
