"""Benchmark readers (LibriSpeech, MMBench TSV, Video-MME parquet) on few-sample fixtures written in each format."""

from __future__ import annotations

import base64
import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from ola_model.processing.audio import load_audio
from ola_model.processing.image import load_image
from ola_model.prompt import ASR_PROMPT
from workflows.data.video import write_mp4
from workflows.eval import BenchmarkFormatError, EvalError, EvalItem, PipelinePredictor, evaluate_benchmark
from workflows.eval.benchmarks import librispeech_items, mmbench_items, videomme_items
from workflows.eval.readers import (
    CHOICE_INSTRUCTION,
    parse_options,
    read_librispeech,
    read_mmbench,
    read_videomme,
    videomme_files,
)

RATE = 16000


def oracle(items: Sequence[EvalItem]) -> list[str]:
    return [item.reference for item in items]


# ------------------------------------------------------------------------------------------------ LibriSpeech
UTTERANCES = {
    ("test-clean", "61", "70968"): ["HE BEGAN A CONFUSED COMPLAINT", "THE TWO MEN LAUGHED"],
    ("test-clean", "121", "121726"): ["ALSO A POPULAR CONTRIVANCE"],
    ("test-other", "1688", "142285"): ["THERE'S SEVEN OF THEM"],
}


def _tone(seconds: float, freq: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * math.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def librispeech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("LibriSpeech")
    for (subset, speaker, chapter), texts in UTTERANCES.items():
        chapter_dir = root / subset / speaker / chapter
        chapter_dir.mkdir(parents=True)
        lines = []
        for i, text in enumerate(texts):
            utt = f"{speaker}-{chapter}-{i:04d}"
            sf.write(chapter_dir / f"{utt}.flac", _tone(0.5 + 0.25 * i, 220 * (i + 1)), RATE, subtype="PCM_16")
            lines.append(f"{utt} {text}")
        (chapter_dir / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return root


def test_librispeech_reader_yields_every_utterance(librispeech: Path) -> None:
    samples = list(read_librispeech(librispeech))
    assert len(samples) == 4
    by_id = {s.id: s for s in samples}
    first = by_id["61-70968-0000"]
    assert first.transcript == "HE BEGAN A CONFUSED COMPLAINT"
    assert (first.speaker, first.chapter, first.subset) == ("61", "70968", "test-clean")
    assert first.sample_rate == RATE and first.seconds == pytest.approx(0.5)
    assert by_id["61-70968-0001"].seconds == pytest.approx(0.75)
    assert by_id["1688-142285-0000"].subset == "test-other"
    wav, rate = first.read_audio()  # soundfile decode of the flac: the tone, to 16-bit precision
    assert rate == RATE and wav.dtype == np.float32
    np.testing.assert_allclose(wav, _tone(0.5, 220), atol=1 / 32767)
    # The model's loader reads the same samples.
    np.testing.assert_allclose(load_audio(first.audio_path).numpy(), wav, atol=1e-6)
    # A single subset as the root: no subset name.
    assert {s.subset for s in read_librispeech(librispeech / "test-other")} == {""}


def test_librispeech_items_score_wer_overall_and_per_subset(librispeech: Path) -> None:
    items = librispeech_items(librispeech)
    assert all(it.request.question == ASR_PROMPT and it.request.audio is not None for it in items)
    assert items[0].metrics == {"librispeech_wer": "wer", "librispeech_test_clean_wer": "wer"}
    perfect = evaluate_benchmark(None, "librispeech", librispeech, predict=oracle, progress=False)
    assert perfect.metrics["librispeech_wer"] == 0.0
    assert perfect.counts == {"librispeech_wer": 4, "librispeech_test_clean_wer": 3, "librispeech_test_other_wer": 1}
    # "THERE'S 7 OF THEM" is right after normalisation; dropping a word of 17 reference words gives 1/17.
    answers = {"1688-142285-0000": "There's 7 of them.", "121-121726-0000": "also popular contrivance"}
    near = evaluate_benchmark(
        None,
        "librispeech",
        librispeech,
        predict=lambda batch: [answers.get(it.id, it.reference.lower()) for it in batch],
        progress=False,
    )
    assert near.metrics["librispeech_wer"] == pytest.approx(1 / 17)
    assert near.metrics["librispeech_test_other_wer"] == 0.0
    limited = evaluate_benchmark(None, "librispeech", librispeech, predict=oracle, limit=1, progress=False)
    assert limited.counts["librispeech_wer"] == 1


def test_librispeech_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkFormatError, match="no such directory"):
        list(read_librispeech(tmp_path / "absent"))
    with pytest.raises(BenchmarkFormatError, match=r"trans\.txt files"):
        list(read_librispeech(tmp_path))
    chapter = tmp_path / "19" / "198"
    chapter.mkdir(parents=True)
    (chapter / "19-198.trans.txt").write_text("19-198-0001 NORTHANGER ABBEY\n")
    with pytest.raises(BenchmarkFormatError, match=r"19-198-0001\.flac is missing"):
        list(read_librispeech(tmp_path))
    (chapter / "19-198.trans.txt").write_text("20-198-0001 WRONG SPEAKER\n")
    with pytest.raises(BenchmarkFormatError, match=r"19-198.trans.txt:1: expected '19-198-<utterance>"):
        list(read_librispeech(tmp_path))
    (chapter / "19-198.trans.txt").write_text("19-198-0001 TEXT\n")
    (chapter / "19-198-0001.flac").write_bytes(b"fLaC but not really")
    with pytest.raises(BenchmarkFormatError, match="soundfile cannot read it"):
        list(read_librispeech(tmp_path))


def test_librispeech_with_the_tiny_model(librispeech: Path, tiny_pipeline) -> None:
    report = evaluate_benchmark(tiny_pipeline, "librispeech", librispeech / "test-other", progress=False)
    assert report.errors == []
    assert report.counts["librispeech_wer"] == 1
    assert report.metrics["librispeech_wer"] >= 0 and math.isfinite(report.metrics["librispeech_wer"])


# ---------------------------------------------------------------------------------------------------- MMBench
def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, format="PNG")
    return buf.getvalue()


RED, BLUE = _png((220, 30, 30)), _png((30, 30, 220))
MMBENCH_ROWS = [
    # index, question, hint, A, B, C, D, answer, image, category
    ("0", "What color is the picture?", "nan", "red", "blue", "green", "white", "A", RED, "color"),
    ("1", "Which is the color?", "Look closely.", "green", "blue", "nan", "nan", "B", BLUE, "color"),
    ("2", "Is it red?", "", "yes", "no", "", "", "A", "0", "yesno"),  # the image of row 0, by index
]


def _write_tsv(path: Path, rows: Sequence[tuple], columns: Sequence[str] | None = None) -> Path:
    columns = columns or ["index", "question", "hint", "A", "B", "C", "D", "answer", "image", "category"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([base64.b64encode(v).decode() if isinstance(v, bytes) else v for v in row][: len(columns)])
    return path


@pytest.fixture
def mmbench(tmp_path: Path) -> Path:
    return _write_tsv(tmp_path / "MMBench_DEV_EN.tsv", MMBENCH_ROWS)


def test_mmbench_reader(mmbench: Path) -> None:
    samples = list(read_mmbench(mmbench))
    assert [s.index for s in samples] == ["0", "1", "2"]
    first, second, third = samples
    assert first.options == {"A": "red", "B": "blue", "C": "green", "D": "white"}
    assert first.hint == "" and first.category == "color" and first.answer == "A"
    assert second.options == {"A": "green", "B": "blue"} and second.hint == "Look closely."
    assert third.image == first.image == RED
    assert load_image(second.image).getpixel((0, 0)) == (30, 30, 220)
    prompt = second.prompt()
    assert prompt.splitlines() == ["Look closely.", "Which is the color?", "A. green", "B. blue", CHOICE_INSTRUCTION]


def test_mmbench_items_score_letters(mmbench: Path) -> None:
    items = mmbench_items(mmbench)
    assert items[0].request.images == [RED] and items[0].options["B"] == "blue"
    chatty = {"mmbench-0": "The answer is A.", "mmbench-1": "B. blue", "mmbench-2": "no"}
    report = evaluate_benchmark(
        None, "mmbench", mmbench, predict=lambda batch: [chatty[it.id] for it in batch], progress=False
    )
    assert report.metrics["mmbench_accuracy"] == pytest.approx(2 / 3)  # "no" is option B, the answer is A
    assert report.counts["mmbench_accuracy"] == 3


def test_mmbench_format_errors(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkFormatError, match="no such file"):
        list(read_mmbench(tmp_path / "absent.tsv"))
    cols = ["index", "question", "A", "B", "image"]
    with pytest.raises(BenchmarkFormatError, match=r"missing columns \['answer'\].*without answers"):
        list(read_mmbench(_write_tsv(tmp_path / "t.tsv", [("0", "q", "x", "y", RED)], cols)))
    bad_answer = [("0", "q", "", "x", "y", "", "", "C", RED, "c")]
    with pytest.raises(BenchmarkFormatError, match=r":2 \(index 0\): answer 'C' is not one of the options"):
        list(read_mmbench(_write_tsv(tmp_path / "a.tsv", bad_answer)))
    bad_image = [("0", "q", "", "x", "y", "", "", "A", "%%%not base64%%%", "c")]
    with pytest.raises(BenchmarkFormatError, match="not valid base64"):
        list(read_mmbench(_write_tsv(tmp_path / "b.tsv", bad_image)))
    dangling = [("0", "q", "", "x", "y", "", "", "A", "7", "c")]
    with pytest.raises(BenchmarkFormatError, match="refers to row index 7"):
        list(read_mmbench(_write_tsv(tmp_path / "c.tsv", dangling)))


def test_mmbench_with_the_tiny_model(mmbench: Path, tiny_pipeline) -> None:
    report = evaluate_benchmark(tiny_pipeline, "mmbench", mmbench, limit=2, batch_size=2, progress=False)
    assert report.errors == [] and report.counts["mmbench_accuracy"] == 2
    assert 0.0 <= report.metrics["mmbench_accuracy"] <= 1.0
    assert all(isinstance(r.prediction, str) and r.prediction for r in report.results)


# -------------------------------------------------------------------------------------------------- Video-MME
def _clip(path: Path, colour: tuple[int, int, int]) -> None:
    frames = [np.full((64, 64, 3), colour, dtype=np.uint8) for _ in range(4)]
    write_mp4(path, frames, fps=4, audio=_tone(1.0, 330), sample_rate=RATE)


@pytest.fixture(scope="module")
def videomme(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Hugging Face layout: videomme/test-*.parquet beside data/<videoID>.mp4."""
    root = tmp_path_factory.mktemp("Video-MME")
    (root / "videomme").mkdir()
    _clip(root / "data" / "vidRed01.mp4", (220, 30, 30))
    _clip(root / "data" / "vidBlu02.mp4", (30, 30, 220))
    rows = {
        "video_id": ["001", "001", "002"],
        "duration": ["short", "short", "medium"],
        "domain": ["Knowledge", "Knowledge", "Film"],
        "videoID": ["vidRed01", "vidRed01", "vidBlu02"],
        "question_id": ["001-1", "001-2", "002-1"],
        "task_type": ["Counting", "Color", "Color"],
        "question": ["How many objects?", "What color fills the video?", "What color fills the video?"],
        "options": [
            ["A. 1", "B. 2", "C. 3", "D. 0"],
            ["A. Red.", "B. Blue.", "C. Green.", "D. White."],
            ["A. Red.", "B. Blue.", "C. Green.", "D. White."],
        ],
        "answer": ["D", "A", "B"],
    }
    pq.write_table(pa.table(rows), root / "videomme" / "test-00000-of-00001.parquet")
    return root


def test_videomme_reader(videomme: Path) -> None:
    parquets, videos = videomme_files(videomme)
    assert videos == videomme / "data" and len(parquets) == 1
    assert videomme_files(parquets[0])[1] == videomme / "data"  # from the parquet file itself, one level up
    samples = list(read_videomme(videomme))
    assert [s.question_id for s in samples] == ["001-1", "001-2", "002-1"]
    first = samples[1]
    assert first.video_path == videomme / "data" / "vidRed01.mp4"
    assert first.options == {"A": "Red.", "B": "Blue.", "C": "Green.", "D": "White."}
    assert (first.answer, first.duration, first.domain, first.task_type) == ("A", "short", "Knowledge", "Color")
    assert first.prompt().splitlines()[1:3] == ["A. Red.", "B. Blue."]


def test_videomme_items_and_duration_breakdown(videomme: Path) -> None:
    items = videomme_items(videomme)
    assert not items[0].request.use_video_audio  # frames only unless asked
    assert videomme_items(videomme, use_video_audio=True)[0].request.use_video_audio
    answers = {"videomme-001-1": "D", "videomme-001-2": "Red", "videomme-002-1": "A"}
    report = evaluate_benchmark(
        None, "videomme", videomme, predict=lambda batch: [answers[it.id] for it in batch], progress=False
    )
    assert report.metrics["videomme_accuracy"] == pytest.approx(2 / 3)
    assert report.metrics["videomme_accuracy_short"] == 1.0
    assert report.metrics["videomme_accuracy_medium"] == 0.0
    assert report.counts == {"videomme_accuracy": 3, "videomme_accuracy_short": 2, "videomme_accuracy_medium": 1}


def test_videomme_missing_videos_and_format_errors(videomme: Path, tmp_path: Path) -> None:
    empty = tmp_path / "novideos"
    empty.mkdir()
    with pytest.raises(BenchmarkFormatError, match=r"vidRed01\.mp4 is missing"):
        list(read_videomme(videomme, videos_dir=empty))
    assert list(read_videomme(videomme, videos_dir=empty, skip_missing=True)) == []
    parquet = videomme / "videomme" / "test-00000-of-00001.parquet"
    with pytest.raises(BenchmarkFormatError, match=r"videos directory .* no such directory"):
        videomme_files(parquet, tmp_path / "absent")
    lonely = tmp_path / "lonely" / "test.parquet"
    lonely.parent.mkdir()
    lonely.write_bytes(parquet.read_bytes())
    with pytest.raises(BenchmarkFormatError, match=r"no directory of \.mp4 videos"):
        list(read_videomme(lonely))
    broken = tmp_path / "bad" / "t.parquet"
    broken.parent.mkdir()
    pq.write_table(pa.table({"videoID": ["vidRed01"], "question": ["q"], "answer": ["A"]}), broken)
    with pytest.raises(BenchmarkFormatError, match=r"missing columns \['options'\]"):
        list(read_videomme(broken, videos_dir=videomme / "data"))
    assert parse_options(["cat", "dog"], "row") == {"A": "cat", "B": "dog"}
    with pytest.raises(BenchmarkFormatError, match="some options start with a letter"):
        parse_options(["A. cat", "dog"], "row")
    with pytest.raises(BenchmarkFormatError, match="at least 2"):
        parse_options(["A. cat"], "row")
    with pytest.raises(EvalError, match="unknown benchmark"):
        evaluate_benchmark(None, "mmlu", videomme, predict=oracle, progress=False)


def test_videomme_with_the_tiny_model(videomme: Path, tiny_pipeline) -> None:
    items = videomme_items(videomme, max_video_frames=4)
    answers = PipelinePredictor(tiny_pipeline)(items[:1])
    assert len(answers) == 1 and isinstance(answers[0], str)
