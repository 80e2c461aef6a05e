"""The synthetic omni world (``ola data synth``): format, loaders, determinism, splits, hashes, reruns, CLI."""

from __future__ import annotations

import argparse
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ola_model.processing.audio import load_audio
from ola_model.processing.image import load_image
from ola_model.processing.video import load_video
from workflows.data import DataFormatError, SynthError, SynthParams, load_split, synthesize, verify
from workflows.data.cli import register
from workflows.data.manifest import MANIFEST, TASK_HEADS, validate_sample
from workflows.data.scenes import layout_scene, render_scene, render_word, sample_scene
from workflows.data.synth import allocate, plan
from workflows.data.tasks import BUILDERS
from workflows.data.world import COLOURS, DEFAULT_MIX, SPEECH_TASKS, SPLITS, TASKS

HAVE_ESPEAK = shutil.which("espeak-ng") is not None
needs_espeak = pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is not installed (apt-get install -y espeak-ng)")
# Without espeak-ng the format and rerun tests still run, on the tasks that need no speech.
MIX = dict(DEFAULT_MIX) if HAVE_ESPEAK else {t: w for t, w in DEFAULT_MIX.items() if t not in SPEECH_TASKS}
SIZE = 48
SEED = 7


def _params(seed: int = SEED, size: int = SIZE) -> SynthParams:
    return SynthParams(seed=seed, size=size, mix=MIX)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    report = synthesize(out, _params(), workers=2, progress=False)
    assert not report.skipped
    return out


@pytest.fixture(scope="module")
def samples(dataset: Path) -> dict[str, list[dict]]:
    return {split: load_split(dataset, split, check_hashes=True) for split in SPLITS}


def _manifest(root: Path) -> dict:
    return json.loads((root / MANIFEST).read_text())


def test_every_task_present_and_records_follow_the_format(dataset: Path, samples: dict[str, list[dict]]) -> None:
    records = [s for split in SPLITS for s in samples[split]]
    assert len(records) == SIZE
    assert {s["task"] for s in records} == set(MIX)
    assert len({s["id"] for s in records}) == SIZE
    for s in records:
        human, answer = s["conversations"][0]["value"], s["conversations"][1]["value"]
        assert human.startswith(TASK_HEADS[s["task"]])
        assert human.count("<image>") == int("image" in s or "video" in s)
        assert human.count("<speech>") == int("audio" in s or "audio_q" in s or s["task"] == "video_audio_qa")
        assert (
            answer
            and answer == answer.lower()
            and len(answer.split()) <= (25 if s["task"] in ("caption", "asr") else 2)
        )
        for key in ("image", "video", "audio", "audio_q"):
            if key in s:
                assert Path(s[key]).is_absolute() and Path(s[key]).is_file()
    if HAVE_ESPEAK:
        spoken = next(s for s in records if s["task"] == "spoken_image_qa")
        assert spoken["conversations"][0]["value"] == "<image>\nUser's question in speech: <speech>\n"
        assert spoken["text_q"].endswith("?")
        asr = next(s for s in records if s["task"] == "asr")
        assert asr["conversations"][0]["value"] == "<speech>\nPlease give the ASR results of the given speech."


def test_media_load_with_ola_loaders(samples: dict[str, list[dict]]) -> None:
    records = [s for split in SPLITS for s in samples[split]]
    for s in records:
        if "image" in s:
            img = load_image(s["image"])
            assert 224 <= max(img.size) <= 448
            assert len(np.unique(np.asarray(img).reshape(-1, 3), axis=0)) > 1  # something drawn on the background
        for key in ("audio", "audio_q"):
            if key in s:
                wav = load_audio(s[key])
                assert wav.dim() == 1 and 0.3 * 16000 < wav.shape[0] < 10 * 16000
                assert float(wav.abs().max()) > 0.1
        if "video" in s:
            clip = load_video(s["video"])
            assert 8 <= clip.num_source_frames <= 24 and clip.num_frames == clip.num_source_frames
            assert clip.fps is not None and 1 <= clip.fps <= 8
            assert clip.audio is not None  # every video has an AAC track (silence for some video_qa)
            expected = clip.num_source_frames / clip.fps
            assert abs(clip.audio.shape[0] / 16000 - expected) < 0.2, (s["id"], clip.audio.shape, expected)


@needs_espeak
def test_narration_is_speech_and_carries_the_fact(samples: dict[str, list[dict]]) -> None:
    narrated = [s for split in SPLITS for s in samples[split] if s["task"] == "video_audio_qa"]
    assert len(narrated) >= 2
    tracks = {}
    for s in narrated:
        audio = load_video(s["video"]).audio.numpy()
        frames = audio[: audio.shape[0] // 400 * 400].reshape(-1, 400)  # 25 ms frames
        energy = np.sqrt((frames**2).mean(axis=1))
        assert energy.max() > 0.05, s["id"]  # audible
        assert (energy > 0.01).sum() * 0.025 > 0.5, s["id"]  # over half a second of voiced sound, not a click
        assert (energy < 0.005).mean() > 0.05, s["id"]  # with pauses (the lead-in at least), not a steady tone
        tracks[s["conversations"][1]["value"] + s["id"]] = audio
    a, b = list(tracks.values())[:2]
    n = min(a.shape[0], b.shape[0])
    assert not np.allclose(a[:n], b[:n], atol=1e-2)


def test_same_seed_is_byte_identical_at_any_worker_count(dataset: Path, tmp_path: Path) -> None:
    again = tmp_path / "b"
    synthesize(again, _params(), workers=1, progress=False)
    first, second = _manifest(dataset), _manifest(again)
    assert first["files"] == second["files"]
    assert (dataset / MANIFEST).read_bytes() == (again / MANIFEST).read_bytes()
    for split in SPLITS:
        assert (dataset / f"{split}.json").read_bytes() == (again / f"{split}.json").read_bytes()


def test_another_seed_gives_other_samples(dataset: Path, tmp_path: Path) -> None:
    other = tmp_path / "c"
    synthesize(other, _params(seed=SEED + 1), workers=2, progress=False)
    a, b = _manifest(dataset)["files"], _manifest(other)["files"]
    assert not set(a.values()) & set(b.values())  # no media file in common
    texts_a = [s["conversations"] for s in json.loads((dataset / "train.json").read_text())]
    texts_b = [s["conversations"] for s in json.loads((other / "train.json").read_text())]
    assert texts_a != texts_b


def test_every_media_file_is_unique(dataset: Path) -> None:
    """Held-out splits share no file with train: even a sentence spoken twice by one voice differs in level,
    padding and noise."""
    files = _manifest(dataset)["files"]
    media = [h for rel, h in files.items() if rel.startswith("media/")]
    assert len(media) == len(set(media)) == len(files) - 3


def test_split_and_task_proportions(samples: dict[str, list[dict]]) -> None:
    fractions = {"train": 0.9, "val": 0.05, "test": 0.05}
    for split, f in fractions.items():
        assert abs(len(samples[split]) - f * SIZE) <= 1
    counts = Counter(s["task"] for split in SPLITS for s in samples[split])
    assert counts == Counter(allocate(SIZE, SynthParams(seed=0, size=SIZE, mix=MIX).mix))
    # At scale, every split follows the mix and the split fractions.
    big = plan(SynthParams(seed=3, size=10000, splits={"train": 0.8, "val": 0.1, "test": 0.1}))
    per_split = Counter(p.split for p in big)
    assert per_split == {"train": 8000, "val": 1000, "test": 1000}
    for task, w in DEFAULT_MIX.items():
        in_test = sum(1 for p in big if p.split == "test" and p.task == task)
        assert abs(in_test - w * 1000) <= 1, task
    assert [p.task for p in big] != [p.task for p in plan(SynthParams(seed=4, size=10000))]


def test_manifest_hashes_verify_and_tampering_is_detected(dataset: Path, tmp_path: Path) -> None:
    assert verify(dataset).ok
    copy = tmp_path / "tampered"
    shutil.copytree(dataset, copy)
    train = json.loads((copy / "train.json").read_text())
    victim = next(s for s in train if "image" in s)["image"]
    data = bytearray((copy / victim).read_bytes())
    data[-20] ^= 0xFF
    (copy / victim).write_bytes(bytes(data))
    gone = next(s for s in train if "audio" in s or "video" in s)
    gone_rel = gone.get("video") or gone.get("audio")
    (copy / gone_rel).unlink()
    (copy / "media" / "img" / "stray.png").write_bytes(b"x")
    report = verify(copy)
    assert not report.ok
    assert report.mismatched == [victim] and report.missing == [gone_rel] and report.unlisted == ["media/img/stray.png"]
    with pytest.raises(DataFormatError, match="sha256"):
        load_split(copy, "train", check_hashes=True)
    with pytest.raises(DataFormatError, match="missing"):
        load_split(copy, "train")


def test_rerun_on_a_complete_directory_is_a_no_op(dataset: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in dataset.rglob("*")}
    report = synthesize(dataset, _params(), workers=2, progress=False)
    assert report.skipped
    assert {p: p.stat().st_mtime_ns for p in dataset.rglob("*")} == before


def test_incomplete_directory_is_generated_again(dataset: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    (broken / MANIFEST).unlink()
    (broken / "train.json").write_text("[")  # a half-written split, as after a crash
    next((broken / "media").rglob("*.png")).write_bytes(b"partial")
    report = synthesize(broken, _params(), workers=2, progress=False)
    assert not report.skipped
    assert _manifest(broken)["files"] == _manifest(dataset)["files"]
    assert verify(broken).ok


def test_a_failing_sample_leaves_no_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(rng: np.random.Generator, media: object) -> dict:
        raise RuntimeError("disk full")

    monkeypatch.setitem(BUILDERS, "ocr", broken)
    with pytest.raises(SynthError, match=r"ocr-\d{6} \(ocr\) failed: RuntimeError: disk full"):
        synthesize(tmp_path / "h", SynthParams(seed=0, size=3, mix={"ocr": 1.0}), workers=1, progress=False)
    assert not (tmp_path / "h" / MANIFEST).exists()
    with pytest.raises(DataFormatError, match="incomplete"):
        load_split(tmp_path / "h", "train")


def test_other_parameters_or_foreign_files_are_refused(tmp_path: Path) -> None:
    small = SynthParams(seed=1, size=4, mix={"ocr": 1.0})
    synthesize(tmp_path / "d", small, workers=1, progress=False)
    with pytest.raises(SynthError, match="different dataset"):
        synthesize(tmp_path / "d", SynthParams(seed=2, size=4, mix={"ocr": 1.0}), workers=1, progress=False)
    report = synthesize(tmp_path / "d", SynthParams(seed=2, size=4, mix={"ocr": 1.0}), workers=1, overwrite=True)
    assert not report.skipped and _manifest(tmp_path / "d")["seed"] == 2
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("mine")
    with pytest.raises(SynthError, match=r"notes\.txt"):
        synthesize(tmp_path / "e", small, workers=1, progress=False)
    assert (tmp_path / "e" / "notes.txt").read_text() == "mine"


def test_bad_parameters_name_the_field() -> None:
    with pytest.raises(SynthError, match="add up to 1"):
        SynthParams(seed=0, size=10, splits={"train": 0.9, "val": 0.2, "test": 0.05})
    with pytest.raises(SynthError, match="unknown tasks"):
        SynthParams(seed=0, size=10, mix={"juggling": 1.0})
    with pytest.raises(SynthError, match="size"):
        SynthParams(seed=0, size=0)
    with pytest.raises(SynthError, match="qa_turns must be an integer from 1 to 16"):
        SynthParams(seed=0, size=10, qa_turns=0)


def test_image_qa_with_several_turns_asks_about_one_scene(tmp_path: Path) -> None:
    mix, splits = {"image_qa": 1.0}, {"train": 1.0, "val": 0.0, "test": 0.0}
    one = SynthParams(seed=4, size=6, mix=mix, splits=splits)
    five = SynthParams(seed=4, size=6, mix=mix, splits=splits, qa_turns=5)
    assert "qa_turns" not in one.to_json() and five.to_json()["qa_turns"] == 5
    synthesize(tmp_path / "one", one, workers=1, progress=False)
    synthesize(tmp_path / "five", five, workers=1, progress=False)
    assert _manifest(tmp_path / "five")["generator"]["params"]["qa_turns"] == 5
    for single, multi in zip(
        load_split(tmp_path / "one", "train"), load_split(tmp_path / "five", "train"), strict=True
    ):
        turns = multi["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and len(turns) >= 6
        questions = [t["value"] for t in turns[::2]]
        assert len(set(questions)) == len(questions)  # no question twice
        assert questions[0].startswith("<image>\n") and not any("<image>" in q for q in questions[1:])
        assert turns[:2] == single["conversations"]  # the same scene, asked the same first question
    with pytest.raises(SynthError, match="different dataset"):  # the turns are part of what a dataset is
        synthesize(tmp_path / "one", five, workers=1, progress=False)


def test_missing_espeak_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("workflows.data.speech.shutil.which", lambda name: None)
    with pytest.raises(SynthError, match="apt-get install -y espeak-ng"):
        synthesize(tmp_path / "f", SynthParams(seed=0, size=4, mix={"asr": 1.0}), workers=1, progress=False)
    assert not (tmp_path / "f").exists()  # nothing written


def test_layout_scene_draws_render_scene_and_says_where() -> None:
    for seed in range(20):
        scene = sample_scene(np.random.default_rng(seed))
        img, placed = layout_scene(scene, np.random.default_rng(100 + seed))
        assert img.tobytes() == render_scene(scene, np.random.default_rng(100 + seed)).tobytes()
        assert [s.group for s in placed] == [g for g in scene.groups for _ in range(g.count)]
        for shape in placed:
            assert shape.r <= shape.cx <= scene.width - shape.r and shape.r <= shape.cy <= scene.height - shape.r
            if shape.group.kind != "ring":  # a ring's centre is the background
                assert img.getpixel((round(shape.cx), round(shape.cy))) == COLOURS[shape.group.colour]


def test_ocr_images_differ_with_the_word() -> None:
    images = {w: np.asarray(render_word(w, np.random.default_rng(5)), dtype=np.int16) for w in ("red", "blue", "star")}
    background = images["red"][0, 0]
    for w, img in images.items():
        assert (np.abs(img - background).sum(axis=2) > 60).sum() > 50, w  # enough ink to read
    assert not np.array_equal(images["red"], images["blue"])
    assert np.abs(images["blue"] - images["star"]).sum(axis=2).astype(bool).sum() > 50


def test_validate_sample_rejects_bad_records() -> None:
    good = {
        "id": "img-000001",
        "task": "image_qa",
        "conversations": [{"from": "human", "value": "<image>\nHow many stars?"}, {"from": "gpt", "value": "two"}],
        "image": "media/img/000001.png",
    }
    validate_sample(good, "x")
    bad_layout = {
        **good,
        "conversations": [{"from": "human", "value": "How many stars? <image>"}, good["conversations"][1]],
    }
    with pytest.raises(DataFormatError, match="human turn"):
        validate_sample(bad_layout, "x")
    with pytest.raises(DataFormatError, match="media keys"):
        validate_sample({**good, "audio": "media/audio/000001.wav"}, "x")
    with pytest.raises(DataFormatError, match="inside"):
        validate_sample({**good, "image": "../outside.png"}, "x")
    with pytest.raises(DataFormatError, match="lowercase"):
        validate_sample({**good, "conversations": [good["conversations"][0], {"from": "gpt", "value": "Two"}]}, "x")
    # image QA may go on with plain questions about the same image; nothing else may
    more = [{"from": "human", "value": "What color is the background?"}, {"from": "gpt", "value": "white"}]
    validate_sample({**good, "conversations": good["conversations"] + more}, "x")
    with pytest.raises(DataFormatError, match="a later question must be plain text"):
        validate_sample({**good, "conversations": good["conversations"] * 2}, "x")
    with pytest.raises(DataFormatError, match=r"conversations\[3\]: an answer must be non-empty lowercase"):
        validate_sample({**good, "conversations": good["conversations"] + [more[0], {"from": "gpt", "value": ""}]}, "x")
    with pytest.raises(DataFormatError, match="expected"):
        validate_sample({**good, "conversations": good["conversations"] + more[:1]}, "x")
    caption = {**good, "id": "cap-000001", "task": "caption"}
    caption["conversations"] = [
        {"from": "human", "value": "<image>\nDescribe the image."},
        {"from": "gpt", "value": "a"},
    ]
    with pytest.raises(DataFormatError, match="caption has one question and one answer, got 4 turns"):
        validate_sample({**caption, "conversations": caption["conversations"] + more}, "x")


def test_cli_synth_prints_a_table_and_reruns_as_a_no_op(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="ola")
    register(parser.add_subparsers(dest="command", required=True))
    argv = ["data", "synth", "--out", str(tmp_path / "g"), "--seed", "3", "--size", "8", "--workers", "1"]
    argv += ["--tasks", "ocr=1,image_qa=1,sound_qa=2", "--splits", "0.5,0.25,0.25", "--no-progress"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "sound_qa" in out and "total" in out and "generated" in out
    counts = _manifest(tmp_path / "g")["counts"]
    assert {s: sum(c.values()) for s, c in counts.items()} == {"train": 4, "val": 2, "test": 2}
    assert sum(counts[s]["sound_qa"] for s in SPLITS) == 4
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    assert "already generated" in capsys.readouterr().out
    args = parser.parse_args(["data", "verify", str(tmp_path / "g")])
    assert args.func(args) == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "synth", "--out", "x", "--size", "4", "--splits", "0.9,0.1"])
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "synth", "--out", "x", "--size", "4", "--tasks", "dance=1"])


def test_every_task_has_a_builder_and_a_layout() -> None:
    assert set(BUILDERS) == set(TASKS) == set(TASK_HEADS) == set(DEFAULT_MIX)
    assert abs(sum(DEFAULT_MIX.values()) - 1) < 1e-9
