"""Readers for the standard file formats of the paper's benchmarks, when the files are on local disk.

- LibriSpeech (ASR, WER): ``<root>/[<subset>/]<speaker>/<chapter>/<speaker>-<chapter>.trans.txt`` whose lines are
  ``<speaker>-<chapter>-<utt> TRANSCRIPT``, next to ``<speaker>-<chapter>-<utt>.flac`` (16 kHz, read with soundfile).
- MMBench (multiple-choice image QA): a TSV with columns ``index, question, hint, A, B, C, D, answer, image`` (the
  image base64-encoded; ``category``, ``l2-category``, ``split`` optional; options may stop after B or C). An image
  cell holding another row's index reuses that row's image, as the released TSVs do for repeated images.
- Video-MME (multiple-choice video QA): parquet rows with ``videoID`` (or ``video_id``), ``question``, ``options`` (a
  list of ``"A. ..."``), ``answer`` (a letter), ``duration``, ``domain``; videos at ``<videos_dir>/<videoID>.mp4``.

Each reader yields typed samples and raises :class:`BenchmarkFormatError` naming the file, the row and the field when
the files are off the format. Nothing here runs a model.
"""

from __future__ import annotations

import base64
import binascii
import csv
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from workflows.eval.errors import BenchmarkFormatError

log = logging.getLogger(__name__)

OPTION_LETTERS = "ABCDEFGHIJ"
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
_EMPTY = {"", "nan", "none", "null"}  # how missing cells appear in TSVs written by pandas


# ------------------------------------------------------------------------------------------------ LibriSpeech
@dataclass(frozen=True)
class LibriSpeechSample:
    """One utterance: its flac file and reference transcript (upper case, as distributed)."""

    id: str  # "<speaker>-<chapter>-<utterance>"
    audio_path: Path
    transcript: str
    speaker: str
    chapter: str
    subset: str  # the directory above the speakers relative to the root, e.g. "test-clean"; "" when it is the root
    sample_rate: int
    seconds: float

    def read_audio(self) -> tuple[np.ndarray, int]:
        """The decoded waveform as float32 (mono [N] or [N, C]) and its sample rate, via soundfile."""
        data, rate = sf.read(str(self.audio_path), dtype="float32")
        return data, rate


def read_librispeech(root: str | Path) -> Iterator[LibriSpeechSample]:
    """Utterances of a LibriSpeech directory (one subset, or a folder of subsets), in sorted file order.

    Raises:
        BenchmarkFormatError: no transcript files, a transcript file or line off the layout, a missing or unreadable
            flac file.
    """
    root = Path(root)
    if not root.is_dir():
        raise BenchmarkFormatError(f"LibriSpeech root {root}: no such directory")
    trans_files = sorted(root.rglob("*.trans.txt"))
    if not trans_files:
        raise BenchmarkFormatError(
            f"LibriSpeech root {root}: no <speaker>/<chapter>/<speaker>-<chapter>.trans.txt files under it"
        )
    for trans in trans_files:
        chapter_dir = trans.parent
        speaker, chapter = chapter_dir.parent.name, chapter_dir.name
        if trans.name != f"{speaker}-{chapter}.trans.txt":
            raise BenchmarkFormatError(
                f"{trans}: expected the name {speaker}-{chapter}.trans.txt for directory {speaker}/{chapter}"
            )
        subset_dir = chapter_dir.parent.parent
        subset = "" if subset_dir == root else subset_dir.relative_to(root).as_posix()
        prefix = f"{speaker}-{chapter}-"
        for lineno, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            utt_id, _, text = line.strip().partition(" ")
            if not utt_id.startswith(prefix) or not text.strip():
                raise BenchmarkFormatError(
                    f"{trans}:{lineno}: expected '{prefix}<utterance> TRANSCRIPT', got {line[:80]!r}"
                )
            flac = chapter_dir / f"{utt_id}.flac"
            if not flac.is_file():
                raise BenchmarkFormatError(f"{trans}:{lineno}: audio file {flac.name} is missing")
            try:
                info = sf.info(str(flac))
            except (sf.LibsndfileError, RuntimeError) as exc:
                raise BenchmarkFormatError(f"{flac}: soundfile cannot read it: {exc}") from exc
            yield LibriSpeechSample(
                id=utt_id,
                audio_path=flac,
                transcript=" ".join(text.split()),
                speaker=speaker,
                chapter=chapter,
                subset=subset,
                sample_rate=info.samplerate,
                seconds=info.frames / info.samplerate if info.samplerate else 0.0,
            )


# ---------------------------------------------------------------------------------------------------- MMBench
@dataclass(frozen=True)
class MMBenchSample:
    """One multiple-choice question about an image."""

    index: str
    question: str
    options: dict[str, str]  # letter -> text, the letters present in order
    answer: str  # the correct letter
    image: bytes  # the encoded image file (PNG / JPEG)
    hint: str = ""
    category: str = ""
    l2_category: str = ""
    split: str = ""

    def prompt(self) -> str:
        return choice_prompt(self.question, self.options, self.hint)


def _cell(row: Mapping[str, str | None], key: str) -> str:
    value = (row.get(key) or "").strip()
    return "" if value.lower() in _EMPTY else value


def read_mmbench(path: str | Path) -> Iterator[MMBenchSample]:
    """Questions of an MMBench TSV (dev split with answers), in file order.

    Raises:
        BenchmarkFormatError: a missing column (``answer`` missing means a test split without answers), fewer than
            two options, an answer that is not one of the options, an image that is not valid base64 or refers to an
            unknown row.
    """
    path = Path(path)
    if not path.is_file():
        raise BenchmarkFormatError(f"MMBench TSV {path}: no such file")
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # base64 images are far above the 128 KiB default
    images: dict[str, bytes] = {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        columns = set(reader.fieldnames or ())
        missing = [c for c in ("index", "question", "A", "B", "answer", "image") if c not in columns]
        if missing:
            hint = " (a test split without answers cannot be scored)" if "answer" in missing else ""
            raise BenchmarkFormatError(f"{path}: missing columns {missing}; found {sorted(columns)}{hint}")
        for rowno, row in enumerate(reader, start=2):
            where = f"{path}:{rowno}"
            index = _cell(row, "index")
            if not index:
                raise BenchmarkFormatError(f"{where}: empty index")
            options = {}
            for letter in OPTION_LETTERS:
                if letter not in columns:
                    break
                text = _cell(row, letter)
                if not text:
                    break
                options[letter] = text
            if len(options) < 2:
                raise BenchmarkFormatError(f"{where} (index {index}): needs options A and B, got {list(options)}")
            answer = _cell(row, "answer").upper()
            if answer not in options:
                raise BenchmarkFormatError(
                    f"{where} (index {index}): answer {answer!r} is not one of the options {list(options)}"
                )
            image = _image_cell(_cell(row, "image"), images, where)
            images[index] = image
            yield MMBenchSample(
                index=index,
                question=_cell(row, "question"),
                options=options,
                answer=answer,
                image=image,
                hint=_cell(row, "hint"),
                category=_cell(row, "category"),
                l2_category=_cell(row, "l2-category") or _cell(row, "l2_category"),
                split=_cell(row, "split"),
            )


def _image_cell(cell: str, earlier: Mapping[str, bytes], where: str) -> bytes:
    """Decode a base64 image cell; a short all-digit cell is the index of an earlier row with the same image."""
    if not cell:
        raise BenchmarkFormatError(f"{where}: empty image cell")
    if cell.isdigit() and len(cell) < 16:
        if cell not in earlier:
            raise BenchmarkFormatError(f"{where}: image refers to row index {cell}, which no earlier row has")
        return earlier[cell]
    try:
        return base64.b64decode(cell, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BenchmarkFormatError(f"{where}: image is not valid base64: {exc}") from exc


def choice_prompt(question: str, options: Mapping[str, str], hint: str = "") -> str:
    """The multiple-choice prompt: hint, question, one ``X. option`` line each, then the letter instruction."""
    lines = [hint] if hint else []
    lines.append(question)
    lines += [f"{letter}. {text}" for letter, text in options.items()]
    lines.append(CHOICE_INSTRUCTION)
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- Video-MME
@dataclass(frozen=True)
class VideoMMESample:
    """One multiple-choice question about a video."""

    question_id: str
    video_id: str  # the video file's stem (``videoID``)
    video_path: Path
    question: str
    options: dict[str, str]
    answer: str
    duration: str = ""  # "short" | "medium" | "long"
    domain: str = ""
    task_type: str = ""

    def prompt(self) -> str:
        return choice_prompt(self.question, self.options)


_OPTION = re.compile(r"^\s*\(?([A-J])[.):]\s*(.*)$", re.DOTALL)


def parse_options(raw: Sequence[str], where: str) -> dict[str, str]:
    """``["A. cat", "B. dog"]`` -> ``{"A": "cat", "B": "dog"}``; options without a letter get A, B, ... in order."""
    items = [str(o).strip() for o in raw]
    if len(items) < 2:
        raise BenchmarkFormatError(f"{where}: options needs at least 2 entries, got {len(items)}")
    parsed = [_OPTION.match(o) for o in items]
    if all(parsed):
        options = {m.group(1): m.group(2).strip() for m in parsed}
        if len(options) != len(items):
            raise BenchmarkFormatError(f"{where}: option letters repeat in {items}")
        return options
    if any(parsed):
        raise BenchmarkFormatError(f"{where}: some options start with a letter and some do not: {items}")
    if len(items) > len(OPTION_LETTERS):
        raise BenchmarkFormatError(f"{where}: {len(items)} options, at most {len(OPTION_LETTERS)} supported")
    return dict(zip(OPTION_LETTERS, items, strict=False))


def videomme_files(path: str | Path, videos_dir: str | Path | None = None) -> tuple[list[Path], Path]:
    """The parquet files and the videos directory of a Video-MME download.

    ``path`` is a parquet file or a directory searched for ``*.parquet``. Without ``videos_dir``, the first of
    ``data/``, ``videos/`` or the directory itself holding an ``.mp4``, next to the parquet or one level up (the
    Hugging Face layout is ``videomme/test-*.parquet`` beside ``data/<videoID>.mp4``), is used.

    Raises:
        BenchmarkFormatError: no parquet file, or no videos directory.
    """
    path = Path(path)
    if path.is_file():
        parquets, base = [path], path.parent
    elif path.is_dir():
        parquets, base = sorted(path.rglob("*.parquet")), path
    else:
        raise BenchmarkFormatError(f"Video-MME path {path}: no such file or directory")
    if not parquets:
        raise BenchmarkFormatError(f"Video-MME path {path}: no .parquet files under it")
    if videos_dir is not None:
        vdir = Path(videos_dir)
        if not vdir.is_dir():
            raise BenchmarkFormatError(f"Video-MME videos directory {vdir}: no such directory")
        return parquets, vdir
    bases = [base, parquets[0].parent, parquets[0].parent.parent]
    candidates = [b / name for b in dict.fromkeys(bases) for name in ("data", "videos", "")]
    for cand in candidates:
        if cand.is_dir() and any(cand.glob("*.mp4")):
            return parquets, cand
    raise BenchmarkFormatError(
        f"Video-MME: no directory of .mp4 videos found near {path} (looked in {[str(c) for c in candidates]}); "
        "pass the videos directory explicitly"
    )


def read_videomme(
    path: str | Path, videos_dir: str | Path | None = None, skip_missing: bool = False
) -> Iterator[VideoMMESample]:
    """Questions of a Video-MME parquet download, in file order.

    Args:
        path: a parquet file or a directory of them (see :func:`videomme_files`).
        videos_dir: the directory of ``<videoID>.mp4`` files (default: found near ``path``).
        skip_missing: skip questions whose video is absent (logged with a count) instead of raising.

    Raises:
        BenchmarkFormatError: pyarrow is missing, a column is missing, a row is off the format, or (without
            ``skip_missing``) a video file is missing.
    """
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pyarrow comes with the train extra (a dependency of mlflow)
        raise BenchmarkFormatError(f"reading Video-MME needs pyarrow (pip install pyarrow): {exc}") from exc
    parquets, vdir = videomme_files(path, videos_dir)
    skipped = 0
    for parquet in parquets:
        try:
            table = pq.read_table(parquet)
        except Exception as exc:  # pyarrow raises several kinds (ArrowInvalid, OSError) for a broken file
            raise BenchmarkFormatError(f"{parquet}: cannot read it as parquet: {exc}") from exc
        columns = set(table.column_names)
        vid_col = "videoID" if "videoID" in columns else "video_id"
        missing = [c for c in (vid_col, "question", "options", "answer") if c not in columns]
        if missing:
            raise BenchmarkFormatError(f"{parquet}: missing columns {missing}; found {sorted(columns)}")
        for rowno, row in enumerate(table.to_pylist()):
            where = f"{parquet} row {rowno}"
            video_id = str(row[vid_col] or "").strip()
            if not video_id:
                raise BenchmarkFormatError(f"{where}: empty {vid_col}")
            raw = row["options"]
            if not isinstance(raw, (list, tuple)):
                raise BenchmarkFormatError(f"{where}: options must be a list of strings, got {type(raw).__name__}")
            options = parse_options(raw, where)
            answer = str(row["answer"] or "").strip().upper()
            if answer not in options:
                raise BenchmarkFormatError(f"{where}: answer {answer!r} is not one of the options {list(options)}")
            video = vdir / f"{video_id}.mp4"
            if not video.is_file():
                if skip_missing:
                    skipped += 1
                    continue
                raise BenchmarkFormatError(
                    f"{where}: video {video} is missing (--skip-missing / skip_missing=True skips such questions)"
                )
            yield VideoMMESample(
                question_id=str(row.get("question_id") or f"{video_id}-{rowno}"),
                video_id=video_id,
                video_path=video,
                question=str(row["question"] or "").strip(),
                options=options,
                answer=answer,
                duration=str(row.get("duration") or ""),
                domain=str(row.get("domain") or ""),
                task_type=str(row.get("task_type") or ""),
            )
    if skipped:
        log.warning("Video-MME: skipped %d questions whose video is not in %s", skipped, vdir)
