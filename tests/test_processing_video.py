"""Video preprocessing: frame geometry, uniform sampling, all frames returned, audio track, decode errors."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from ola_model.errors import InputError, LimitError, MediaError
from ola_model.processing.video import (
    VideoClip,
    load_video,
    process_video_frame,
    sample_frame_indices,
    video_frame_size,
)

GRAY = (127 / 255 - 0.5) / 0.5


def _frame(index: int, width: int, height: int) -> np.ndarray:
    """A dark frame with a coloured square that moves with ``index``."""
    img = np.full((height, width, 3), 30, dtype=np.uint8)
    side = max(4, min(width, height) // 4)
    x = (index * 3) % (width - side)
    y = (index * 2) % (height - side)
    img[y : y + side, x : x + side] = ((index * 40) % 256, 200, 255 - (index * 40) % 256)
    return img


def make_video(
    path: Path,
    *,
    num_frames: int = 24,
    width: int = 64,
    height: int = 48,
    fps: int = 24,
    tone_hz: float | None = 440.0,
    options: dict[str, str] | None = None,
) -> Path:
    """Write an mp4: h264 video of moving squares and, when ``tone_hz`` is set, an aac mono sine at 44.1 kHz."""
    with av.open(str(path), "w", format="mp4", options=options or {}) as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = None
        if tone_hz is not None:
            audio = out.add_stream("aac", rate=44100)
            audio.layout = "mono"
        for i in range(num_frames):
            for packet in video.encode(av.VideoFrame.from_ndarray(_frame(i, width, height), format="rgb24")):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        if audio is not None:
            total = 44100 * num_frames // fps
            for start in range(0, total, 1024):
                t = np.arange(start, min(start + 1024, total)) / 44100
                samples = (0.5 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)[None, :]
                frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
                frame.sample_rate, frame.pts = 44100, start
                for packet in audio.encode(frame):
                    out.mux(packet)
            for packet in audio.encode():
                out.mux(packet)
    return path


def _decode_all(path: Path) -> list[Image.Image]:
    with av.open(str(path)) as container:
        return [frame.to_image() for frame in container.decode(video=0)]


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1920, 1080), (640, 320)),
        ((640, 360), (640, 384)),
        ((400, 300), (448, 320)),  # within the area range: padded
        ((64, 48), (320, 192)),  # under 288^2: scaled up
        ((3840, 2160), (640, 320)),
    ],
)
def test_video_frame_size(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert video_frame_size(*size) == expected


def test_video_frame_size_training_geometry() -> None:
    assert video_frame_size(1920, 1080, max_area=448 * 448, stride=32) == (576, 320)


@pytest.mark.parametrize("size", [(2000, 20), (100000, 3), (20, 2000)])
def test_extreme_aspect_ratio_is_a_clear_error(size: tuple[int, int]) -> None:
    with pytest.raises(MediaError, match="aspect ratio too extreme") as info:
        video_frame_size(*size)
    assert info.value.kind == "video"
    with pytest.raises(MediaError):
        video_frame_size(0, 100)


def test_sample_frame_indices() -> None:
    indices = sample_frame_indices(100, 64)
    assert len(indices) == 64 and len(set(indices)) == 64
    assert indices == sorted(indices) and indices[0] == 0 and indices[-1] == 99
    assert set(np.diff(indices)) <= {1, 2}
    assert sample_frame_indices(10, 64) == list(range(10))
    assert sample_frame_indices(1, 64) == [0]
    assert sample_frame_indices(5, 2) == [0, 4]
    assert sample_frame_indices(0, 64) == []


def test_process_video_frame_pads_with_gray() -> None:
    frame = process_video_frame(Image.new("RGB", (400, 300), (255, 255, 255)))
    assert frame.shape == (3, 320, 448) and frame.dtype == torch.float32
    torch.testing.assert_close(frame[:, 0, 0], torch.full((3,), GRAY))
    torch.testing.assert_close(frame[:, 160, 224], torch.ones(3))  # centre: the white image
    assert frame.min() >= -1 and frame.max() <= 1


def test_long_video_samples_64_uniform_frames_all_returned(tmp_path: Path) -> None:
    path = make_video(tmp_path / "long.mp4", num_frames=100, tone_hz=None)
    clip = load_video(path, max_frames=64)
    assert isinstance(clip, VideoClip)
    assert clip.frame_indices == sample_frame_indices(100, 64)
    assert clip.num_source_frames == 100 and clip.num_frames == 64
    assert clip.frames.shape == (64, 3, 192, 320) and clip.frames.dtype == torch.float32
    assert clip.frame_size == video_frame_size(64, 48)
    assert clip.original_size == (64, 48)
    assert clip.fps == pytest.approx(24.0)
    assert clip.audio is None
    # Every returned frame is the processed source frame at its index.
    source = _decode_all(path)
    for k in (0, 1, 31, 63):
        torch.testing.assert_close(clip.frames[k], process_video_frame(source[clip.frame_indices[k]]))
    assert not torch.equal(clip.frames[0], clip.frames[-1])


def test_short_video_with_audio(tmp_path: Path) -> None:
    path = make_video(tmp_path / "short.mp4", num_frames=10, fps=10)
    clip = load_video(path.read_bytes(), max_frames=64)
    assert clip.frame_indices == list(range(10))
    assert clip.frames.shape == (10, 3, 192, 320)
    assert clip.audio is not None and clip.audio.dtype == torch.float32 and clip.audio.dim() == 1
    assert abs(clip.audio.shape[0] - 16000) < 0.15 * 16000  # 1 s, plus the aac encoder delay
    spectrum = np.abs(np.fft.rfft(clip.audio.numpy()))
    assert abs(np.fft.rfftfreq(clip.audio.shape[0], 1 / 16000)[spectrum.argmax()] - 440) <= 3
    assert load_video(path, max_frames=4, with_audio=False).audio is None


def test_padded_video_frames(tmp_path: Path) -> None:
    path = make_video(tmp_path / "mid.mp4", num_frames=3, width=400, height=300, tone_hz=None)
    clip = load_video(path, max_frames=2)
    assert clip.frame_indices == [0, 2]
    assert clip.frames.shape == (2, 3, 320, 448)
    torch.testing.assert_close(clip.frames[:, :, 0, 0], torch.full((2, 3), GRAY))


def test_frame_limits(tmp_path: Path) -> None:
    path = make_video(tmp_path / "v.mp4", num_frames=4, tone_hz=None)
    with pytest.raises(LimitError, match="64") as info:
        load_video(path, max_frames=65)
    assert info.value.limit == 64
    with pytest.raises(LimitError):
        load_video(path, max_frames=9, frame_limit=8)
    with pytest.raises(InputError):
        load_video(path, max_frames=0)


def test_truncated_faststart_video_keeps_decodable_frames(tmp_path: Path) -> None:
    path = make_video(
        tmp_path / "fs.mp4", num_frames=48, width=128, height=96, tone_hz=None, options={"movflags": "faststart"}
    )
    data = path.read_bytes()
    clip = load_video(data[: int(len(data) * 0.6)], max_frames=8)
    assert 0 < clip.num_source_frames < 48
    assert clip.frame_indices == sample_frame_indices(clip.num_source_frames, 8)
    assert clip.frames.shape[0] == len(clip.frame_indices)


def test_corrupt_inputs_raise_media_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    full = make_video(tmp_path / "full.mp4", num_frames=24).read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(full[: len(full) // 2])  # the index (moov) is at the end: it is lost
    text = tmp_path / "notes.txt"
    text.write_text("definitely not a video\n" * 40)
    image = tmp_path / "still.png"
    Image.new("RGB", (32, 32)).save(image)
    audio_only = tmp_path / "tone.m4a"
    with av.open(str(audio_only), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    cases = [
        (junk, None),
        (truncated, None),
        (text, "not a video"),
        (image, "not a video"),
        (audio_only, "no video stream"),
        (tmp_path / "missing.mp4", "not found"),
        (b"", None),
    ]
    for source, match in cases:
        with pytest.raises(MediaError, match=match) as info:
            load_video(source)
        assert info.value.kind == "video"
        assert info.value.reason


def test_audio_track_duration_limit(tmp_path: Path) -> None:
    path = make_video(tmp_path / "av.mp4", num_frames=20, fps=10)  # 2 s of audio
    assert load_video(path, max_frames=2, max_audio_seconds=10).audio is not None
    with pytest.raises(LimitError, match="audio duration"):
        load_video(path, max_frames=2, max_audio_seconds=1)


def test_extreme_aspect_ratio_video_is_a_clear_error(tmp_path: Path) -> None:
    path = make_video(tmp_path / "strip.mp4", num_frames=2, width=1000, height=16, tone_hz=None)
    with pytest.raises(MediaError, match="aspect ratio too extreme"):
        load_video(path)


def test_container_without_frame_count(tmp_path: Path) -> None:
    path = tmp_path / "clip.mkv"
    with av.open(str(path), "w", format="matroska") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(30):
            for packet in stream.encode(av.VideoFrame.from_ndarray(_frame(i, 64, 48), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # matroska stores no frame count: frames are counted
    clip = load_video(path, max_frames=8)
    assert clip.num_source_frames == 30
    assert clip.frame_indices == sample_frame_indices(30, 8)
    source = _decode_all(path)
    torch.testing.assert_close(clip.frames[-1], process_video_frame(source[29]))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_process_that_decoded_video_in_a_thread_can_fork(tmp_path: Path) -> None:
    """PyAV keeps a frame converter per thread for the thread's lifetime; with swscale's automatic slice threads, a
    fork after a thread decoded video hung in the child (freeing that converter waits on threads only the parent
    has). The services decode in worker threads, and Ray and multiprocessing fork."""
    path = make_video(tmp_path / "v.mp4", num_frames=6, width=320, height=240, tone_hz=None)
    decoded, release = threading.Event(), threading.Event()

    def worker() -> None:
        load_video(path, max_frames=4, with_audio=False)
        decoded.set()
        release.wait(30)  # the thread, and its converter, stay alive while the process forks

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    assert decoded.wait(30)
    try:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.02)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
    finally:
        release.set()
        thread.join(5)
