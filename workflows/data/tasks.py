"""One sample of each task: draw its content from its own random stream, write its media, return the record.

A sample's content depends only on (seed, index) through ``np.random.SeedSequence([seed, 1, index])``, never on which
worker builds it or in which order, so generation is reproducible at any ``--workers``.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ola_model.prompt import ASR_PROMPT, user_content
from workflows.data.errors import SynthError
from workflows.data.manifest import MULTI_TURN_TASKS
from workflows.data.scenes import (
    CAPTION_PROMPTS,
    OCR_PROMPTS,
    caption,
    render_scene,
    render_word,
    sample_scene,
    sample_word,
    scene_question,
    scene_questions,
)
from workflows.data.sounds import render_sounds, sample_sound_spec, sound_question
from workflows.data.speech import SAMPLE_RATE, asr_sentence, speech_clip, write_wav
from workflows.data.video import render_frames, sample_clip, scene_clip, write_mp4
from workflows.data.world import COLOURS, NAMES, SHAPES, WORDS, number_word, pick

# id prefix of each task: "img-000123"
ID_PREFIXES: dict[str, str] = {
    "image_qa": "img",
    "caption": "cap",
    "ocr": "ocr",
    "asr": "asr",
    "spoken_image_qa": "sqa",
    "sound_qa": "snd",
    "video_qa": "vid",
    "video_audio_qa": "vaq",
}
MEDIA_DIRS: dict[str, str] = {
    "image": "media/img",
    "audio": "media/audio",
    "audio_q": "media/speech",
    "video": "media/video",
}
MAX_QA_TURNS = 16  # questions one image-QA sample may carry
NARRATION_LEAD = 0.1  # seconds of silence before a narration (the clip has its own too)


@dataclass(frozen=True)
class SampleJob:
    """What a worker needs to build one sample."""

    index: int
    task: str
    seed: int
    root: str  # the dataset directory
    id_width: int = 6
    qa_turns: int = 1  # questions per image-QA sample


@dataclass
class SampleResult:
    """A built sample: its record (media paths relative to the root) and the sha256 of each file it wrote."""

    index: int
    sample: dict
    files: dict[str, str]


def sample_id(task: str, index: int, width: int = 6) -> str:
    return f"{ID_PREFIXES[task]}-{index:0{width}d}"


class _Media:
    """Writes one sample's media under ``root`` and remembers each file's hash."""

    def __init__(self, root: Path, index: int, width: int) -> None:
        self.root, self.stem = root, f"{index:0{width}d}"
        self.files: dict[str, str] = {}

    def _path(self, key: str, ext: str) -> tuple[str, Path]:
        rel = f"{MEDIA_DIRS[key]}/{self.stem}{ext}"
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return rel, path

    def _record(self, rel: str, path: Path) -> str:
        self.files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        return rel

    def image(self, img: Image.Image) -> str:
        rel, path = self._path("image", ".png")
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=False, compress_level=6)  # no text chunks or times: stable bytes
        path.write_bytes(buf.getvalue())
        return self._record(rel, path)

    def wav(self, key: str, wav: np.ndarray) -> str:
        rel, path = self._path(key, ".wav")
        write_wav(path, wav, SAMPLE_RATE)
        return self._record(rel, path)

    def video(self, frames: list[np.ndarray], fps: int, audio: np.ndarray) -> str:
        rel, path = self._path("video", ".mp4")
        write_mp4(path, frames, fps, audio, SAMPLE_RATE)
        return self._record(rel, path)


def _turns(human: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]


def _image_qa(rng: np.random.Generator, media: _Media, turns: int = 1) -> dict:
    """One scene and ``turns`` different questions about it (LLaVA-style turns; the image goes with the first)."""
    scene = sample_scene(rng)
    pairs = scene_questions(scene, rng, turns)
    image = media.image(render_scene(scene, rng))
    conversation = []
    for i, (question, answer) in enumerate(pairs):
        conversation += _turns(user_content(question, num_images=1) if i == 0 else question, answer)
    return {"conversations": conversation, "image": image}


def _caption(rng: np.random.Generator, media: _Media) -> dict:
    scene = sample_scene(rng)
    image = media.image(render_scene(scene, rng))
    return {
        "conversations": _turns(user_content(pick(rng, CAPTION_PROMPTS), num_images=1), caption(scene)),
        "image": image,
    }


def _ocr(rng: np.random.Generator, media: _Media) -> dict:
    word = sample_word(rng)
    image = media.image(render_word(word, rng))
    return {"conversations": _turns(user_content(pick(rng, OCR_PROMPTS), num_images=1), word), "image": image}


def _asr(rng: np.random.Generator, media: _Media) -> dict:
    sentence = asr_sentence(rng)
    audio = media.wav("audio", speech_clip(sentence, rng))
    return {"conversations": _turns(user_content(ASR_PROMPT, audio=True), sentence), "audio": audio}


def _spoken_image_qa(rng: np.random.Generator, media: _Media) -> dict:
    scene = sample_scene(rng)
    question, answer = scene_question(scene, rng)
    image = media.image(render_scene(scene, rng))
    audio_q = media.wav("audio_q", speech_clip(question, rng))
    human = user_content("", num_images=1, audio=True, spoken_question=True)
    return {"conversations": _turns(human, answer), "image": image, "audio_q": audio_q, "text_q": question}


def _sound_qa(rng: np.random.Generator, media: _Media) -> dict:
    spec = sample_sound_spec(rng)
    audio = media.wav("audio", render_sounds(spec, rng))
    question, answer = sound_question(spec, rng)
    return {"conversations": _turns(user_content(question, audio=True), answer), "audio": audio}


def _fit(wav: np.ndarray, num_samples: int, offset: int = 0) -> np.ndarray:
    """``wav`` placed at ``offset`` in a silent track of ``num_samples`` (cut at the end if longer)."""
    out = np.zeros(num_samples, dtype=np.float32)
    piece = wav[: max(0, num_samples - offset)]
    out[offset : offset + piece.shape[0]] = piece
    return out


def _video_qa(rng: np.random.Generator, media: _Media) -> dict:
    spec, question, answer = sample_clip(rng)
    if rng.random() < 0.5:  # the track is silence or unrelated sounds; the question is about the frames
        track = np.zeros(spec.num_audio_samples, dtype=np.float32)
    else:
        track = _fit(render_sounds(sample_sound_spec(rng, max_count=3), rng), spec.num_audio_samples)
    video = media.video(render_frames(spec), spec.fps, track)
    return {"conversations": _turns(user_content(question, video=True), answer), "video": video}


def narration_fact(rng: np.random.Generator, kind: str, colour: str) -> tuple[str, str, str]:
    """(narration, question, answer) for a fact only the narration carries, about a visible ``colour`` ``kind``."""
    fact = pick(rng, ("name", "number", "word", "likes"))
    if fact == "name":
        name = pick(rng, NAMES)
        return f"the {colour} {kind} is named {name}", f"What is the name of the {colour} {kind}?", name
    if fact == "number":
        word = number_word(int(rng.integers(0, 13)))
        return f"the number is {word}", "What number does the voice say?", word
    if fact == "word":
        word = pick(rng, WORDS)
        return f"the secret word is {word}", "What is the secret word?", word
    liked = pick(rng, [c for c in COLOURS if c != colour])
    return f"the {kind} likes {liked}", f"Which color does the {kind} like?", liked


def _video_audio_qa(rng: np.random.Generator, media: _Media) -> dict:
    # The fact is about a shape the clip shows; the clip is made long enough to hold the narration.
    subject = (pick(rng, SHAPES), pick(rng, tuple(COLOURS)))
    narration, question, answer = narration_fact(rng, *subject)
    speech = speech_clip(narration, rng)
    lead = round(NARRATION_LEAD * SAMPLE_RATE)
    spec = scene_clip(rng, min_seconds=(lead + speech.shape[0]) / SAMPLE_RATE + 0.3, subject=subject)
    if spec.num_audio_samples < lead + speech.shape[0]:
        raise SynthError(f"a {speech.shape[0] / SAMPLE_RATE:.1f} s narration does not fit a {spec.duration:.1f} s clip")
    video = media.video(render_frames(spec), spec.fps, _fit(speech, spec.num_audio_samples, lead))
    return {"conversations": _turns(user_content(question, video=True, audio=True), answer), "video": video}


BUILDERS: dict[str, Callable[[np.random.Generator, _Media], dict]] = {
    "image_qa": _image_qa,
    "caption": _caption,
    "ocr": _ocr,
    "asr": _asr,
    "spoken_image_qa": _spoken_image_qa,
    "sound_qa": _sound_qa,
    "video_qa": _video_qa,
    "video_audio_qa": _video_audio_qa,
}


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of sample ``index`` of a dataset with ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([seed, 1, index]))  # 1: samples (the plan uses 0)


def build_sample(job: SampleJob) -> SampleResult:
    """Build one sample (the worker entry point): write its media under ``job.root`` and return its record.

    Raises:
        SynthError: naming the sample, when anything fails.
    """
    sid = sample_id(job.task, job.index, job.id_width)
    media = _Media(Path(job.root), job.index, job.id_width)
    try:
        options = {"turns": job.qa_turns} if job.task in MULTI_TURN_TASKS else {}
        body = BUILDERS[job.task](sample_rng(job.seed, job.index), media, **options)
    except SynthError as exc:
        raise SynthError(f"sample {sid} ({job.task}): {exc}") from None
    except Exception as exc:
        raise SynthError(f"sample {sid} ({job.task}) failed: {type(exc).__name__}: {exc}") from exc
    return SampleResult(job.index, {"id": sid, "task": job.task, **body}, media.files)
