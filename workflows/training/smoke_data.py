"""A very small dataset in the ``docs/data-format.md`` layout, for training tests and smoke runs.

Every task of the format appears at least once (images, audio, a spoken question, a video with and without its
audio), with plain synthetic media: coloured shapes, sine tones, a moving square. It makes no claim to teach
anything; the synthetic data generator (``workflows/data``) writes real training sets.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import av
import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

from ola_model.prompt import ASR_PROMPT

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
NUMBERS = ("zero", "one", "two", "three", "four")


def _image(path: Path, color: str, count: int, size: tuple[int, int], rng: np.random.Generator) -> None:
    img = Image.new("RGB", size, (245, 245, 245))
    draw = ImageDraw.Draw(img)
    w, h = size
    for _ in range(count):
        x, y = int(rng.integers(4, w - 16)), int(rng.integers(4, h - 16))
        draw.ellipse([x, y, x + 12, y + 12], fill=COLORS[color])
    img.save(path)


def _tone(path: Path, freqs: list[float], seconds: float, rate: int = 16000) -> None:
    t = np.arange(int(seconds * rate)) / rate
    wav = sum(0.3 * np.sin(2 * np.pi * f * t) for f in freqs) / max(1, len(freqs))
    sf.write(path, wav.astype(np.float32), rate)


def _video(path: Path, frames: int, direction: int, tone_hz: float, size: int = 64, fps: int = 4) -> None:
    """An h264 mp4 of a square moving left or right, with an aac mono tone track at 16 kHz."""
    with av.open(str(path), "w", format="mp4") as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = size, size, "yuv420p"
        audio = out.add_stream("aac", rate=16000)
        audio.layout = "mono"
        for i in range(frames):
            arr = np.full((size, size, 3), 240, np.uint8)
            x = 8 + (i * 8 if direction > 0 else (frames - 1 - i) * 8)
            arr[24:40, x : x + 16] = COLORS["blue"]
            for packet in video.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        total = 16000 * frames // fps
        for start in range(0, total, 1024):
            t = np.arange(start, min(start + 1024, total)) / 16000
            samples = (0.3 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)[None, :]
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, start
            for packet in audio.encode(frame):
                out.mux(packet)
        for packet in audio.encode():
            out.mux(packet)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_smoke_dataset(root: str | Path, seed: int = 0) -> Path:
    """Write the dataset (13 samples, all in ``train``; ``val`` and ``test`` hold one each) and return ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for sub in ("img", "audio", "video"):
        (root / "media" / sub).mkdir(parents=True, exist_ok=True)
    samples: list[dict] = []

    def add(task: str, human: str, answer: str, **media: str) -> None:
        sid = f"{task}-{len(samples):04d}"
        convs = [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]
        samples.append({"id": sid, "task": task, "conversations": convs, **media})

    for i, (color, count) in enumerate([("red", 1), ("blue", 2), ("green", 3), ("yellow", 2)]):
        rel = f"media/img/{i:04d}.png"
        _image(root / rel, color, count, (64 + 32 * (i % 2), 48), rng)
        if i < 2:
            add("caption", "<image>\nDescribe the image.", f"{NUMBERS[count]} {color} circles", image=rel)
        else:
            add("image_qa", f"<image>\nHow many {color} circles are there?", NUMBERS[count], image=rel)
    rel = "media/img/ocr.png"
    img = Image.new("RGB", (96, 32), (255, 255, 255))
    ImageDraw.Draw(img).text((8, 8), "hello", fill=(0, 0, 0))
    img.save(root / rel)
    add("ocr", "<image>\nWhat word is written in the image?", "hello", image=rel)
    for i, (freqs, text) in enumerate([([220.0], "hello world"), ([330.0, 440.0], "good morning")]):
        rel = f"media/audio/asr-{i}.wav"
        _tone(root / rel, freqs, 1.0 + 0.5 * i)
        add("asr", f"<speech>\n{ASR_PROMPT}", text, audio=rel)
    rel = "media/audio/beeps.wav"
    _tone(root / rel, [880.0], 0.8)
    add("sound_qa", "<speech>\nIs the tone high or low?", "high", audio=rel)
    rel_q = "media/audio/question.wav"
    _tone(root / rel_q, [300.0], 1.2)
    add(
        "spoken_image_qa",
        "<image>\nUser's question in speech: <speech>\n",
        "two",
        image="media/img/0001.png",
        audio_q=rel_q,
        text_q="How many blue circles are there?",
    )
    for i, direction in enumerate((1, -1)):
        rel = f"media/video/{i:04d}.mp4"
        _video(root / rel, frames=4 + 2 * i, direction=direction, tone_hz=500.0 + 100 * i)
        add("video_qa", "<image>\nWhich way does the square move?", "right" if direction > 0 else "left", video=rel)
    add("video_audio_qa", "<speech><image>\nWhat is the square named?", "bob", video="media/video/0000.mp4")
    add("video_audio_qa", "<speech><image>\nWhat number is said?", "seven", video="media/video/0001.mp4")
    splits = {"train": samples, "val": samples[:1], "test": samples[1:2]}
    for name, rows in splits.items():
        (root / f"{name}.json").write_text(json.dumps(rows, indent=1))
    files = {str(p.relative_to(root)): _sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}
    counts = {name: {} for name in splits}
    for name, rows in splits.items():
        for s in rows:
            counts[name][s["task"]] = counts[name].get(s["task"], 0) + 1
    manifest = {
        "format": "ola-synth/1",
        "seed": seed,
        "size": sum(sum(c.values()) for c in counts.values()),  # val and test reuse train samples
        "splits": {name: f"{name}.json" for name in splits},
        "counts": counts,
        "files": files,
        "generator": {"version": "smoke-1", "params": {}},
    }
    tmp = root / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, root / "manifest.json")
    return root
