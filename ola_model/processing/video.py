"""Video preprocessing: PyAV decoding, uniform frame sampling, per-frame geometry (``ola-architecture.md`` §2.5).

A video becomes up to ``max_frames`` uniformly spaced frames, each one view (no low-res view) normalised to [-1, 1],
plus its audio track as a 16 kHz mono waveform. Unlike the released inference code, *all* sampled frames are returned
and sampled only once (the official ``infer.py`` samples twice and feeds a single frame to the LLM).
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from ola_model.errors import InputError, LimitError, MediaError
from ola_model.processing.audio import SAMPLE_RATE, decode_audio_array, decode_audio_stream
from ola_model.processing.av_packets import TolerantDecoder, exception_reason
from ola_model.processing.image import image_to_tensor, pad_to_size

logger = logging.getLogger(__name__)

# FFmpeg demuxers that "open" things that are not videos: text (rendered as ANSI art) and still images.
_NOT_VIDEO_FORMATS = frozenset({"tty", "image2", "image2pipe"})


@dataclass
class VideoClip:
    """Sampled, preprocessed frames of one video and its audio track.

    Attributes:
        frames: [T, 3, H, W] float32 in [-1, 1]; H, W multiples of the video stride (64).
        frame_indices: the T source frame indices (0-based, in decoding order), sorted and unique.
        num_source_frames: N, the number of frames decoded from the video.
        fps: the stream's average frame rate, or None when the container does not say.
        original_size: (width, height) of the source frames.
        audio: [M] float32 16 kHz mono waveform of the first audio stream, or None when there is none.
    """

    frames: torch.Tensor
    frame_indices: list[int]
    num_source_frames: int
    fps: float | None
    original_size: tuple[int, int]
    audio: torch.Tensor | None

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def frame_size(self) -> tuple[int, int]:
        """(width, height) of the processed frames."""
        return int(self.frames.shape[3]), int(self.frames.shape[2])


def video_frame_size(
    width: int,
    height: int,
    max_area: int = 480 * 480,
    min_area: int = 288 * 288,
    stride: int = 64,
) -> tuple[int, int]:
    """Size of a processed video frame for a ``width`` x ``height`` source.

    Over ``max_area`` pixels the frame is scaled down to about that area, under ``min_area`` scaled up to about that
    area; in both cases each side becomes floor(side * s / stride) * stride. Otherwise each side is padded up to the
    next multiple of ``stride``.

    Returns:
        (W, H), both positive multiples of ``stride``.

    Raises:
        MediaError: ("video", ...) for an empty frame, or an aspect ratio so extreme that a side would become 0.
    """
    what = f"frame {width}x{height}"
    if width < 1 or height < 1:
        raise MediaError("video", what, "frame size is empty; both sides must be at least 1 pixel")
    area = width * height
    if area > max_area or area < min_area:
        scale = math.sqrt((max_area if area > max_area else min_area) / area)
        new_w = int(width * scale / stride) * stride
        new_h = int(height * scale / stride) * stride
        if new_w == 0 or new_h == 0:
            raise MediaError(
                "video",
                what,
                f"aspect ratio too extreme: scaling to about {max_area if area > max_area else min_area} pixels "
                f"gives {width * scale:.1f}x{height * scale:.1f}, and a side under the stride of {stride} pixels "
                "would become 0",
            )
        return new_w, new_h
    return -(-width // stride) * stride, -(-height // stride) * stride


def process_video_frame(
    img: Image.Image,
    max_area: int = 480 * 480,
    min_area: int = 288 * 288,
    stride: int = 64,
) -> torch.Tensor:
    """Resize (BICUBIC) or gray-pad one frame to :func:`video_frame_size` and normalise it.

    Returns:
        [3, H, W] float32 in [-1, 1].
    """
    width, height = img.size
    size = video_frame_size(width, height, max_area=max_area, min_area=min_area, stride=stride)
    img = img.convert("RGB")
    area = width * height
    if area > max_area or area < min_area:
        img = img.resize(size, Image.Resampling.BICUBIC)
    else:
        img = pad_to_size(img, size)
    return image_to_tensor(img)


def sample_frame_indices(num_frames: int, max_frames: int) -> list[int]:
    """Uniformly spaced frame indices: round(linspace(0, N - 1, min(max_frames, N))), unique and sorted."""
    if num_frames < 1 or max_frames < 1:
        return []
    count = min(max_frames, num_frames)
    return sorted({int(i) for i in np.rint(np.linspace(0, num_frames - 1, count))})


def _describe(source: str | Path | bytes) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return str(source)


def _open(source: str | Path | bytes, what: str) -> av.container.InputContainer:
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            return av.open(io.BytesIO(bytes(source)), mode="r")
        return av.open(str(source), mode="r")
    except FileNotFoundError as exc:
        raise MediaError("video", what, "file not found") from exc
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise MediaError("video", what, f"cannot open as a video container: {exception_reason(exc)}") from exc


def _decode_pass(
    source: str | Path | bytes,
    what: str,
    wanted: set[int],
    convert: Callable[[Image.Image], torch.Tensor],
) -> tuple[dict[int, torch.Tensor], int, tuple[int, int] | None]:
    """Decode every frame of the first video stream, converting only the ``wanted`` indices.

    Only the selected frames are kept, already at the processed size. Packets that fail to decode are skipped (the
    frames that do decode are counted and indexed), so a truncated file yields its decodable prefix.

    Returns:
        (index -> [3, H, W] tensor, number of frames decoded, (width, height) of the first frame or None).
    """
    kept: dict[int, torch.Tensor] = {}
    count = 0
    decoder = TolerantDecoder("video", what)
    first_size: tuple[int, int] | None = None
    with _open(source, what) as container:
        if not container.streams.video:
            raise MediaError("video", what, "no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in decoder.frames(container, stream):
                if first_size is None:
                    first_size = (frame.width, frame.height)
                if count in wanted:
                    # One swscale thread: PyAV (18+) keeps a converter per thread for the thread's lifetime, and
                    # with automatic slice threads a process that forks later (multiprocessing, Ray's process
                    # start) hangs in the child, which frees the other threads' converters and waits on slice
                    # threads that exist only in the parent. Frames are small; the services decode many at once.
                    img = frame.to_image(threads=1)
                    if img.size != first_size:  # resolution changed mid-stream: one geometry per clip
                        img = img.resize(first_size, Image.Resampling.BICUBIC)
                    kept[count] = convert(img)
                count += 1
        except InputError:  # e.g. an unusable frame geometry: not a decoding failure
            raise
        except (av.FFmpegError, ValueError) as exc:  # the container itself broke off
            logger.warning("video %s: reading stopped early after %d frames (%s)", what, count, exception_reason(exc))
    if decoder.bad_packets:
        logger.warning("video %s: %d undecodable packets skipped; %d frames decoded", what, decoder.bad_packets, count)
    return kept, count, first_size


def _stream_info(source: str | Path | bytes, what: str) -> tuple[int, float | None, bool]:
    """(container's frame count or 0, average fps or None, whether there is an audio stream)."""
    with _open(source, what) as container:
        if not container.streams.video:
            raise MediaError("video", what, "no video stream")
        fmt = container.format.name
        if fmt in _NOT_VIDEO_FORMATS or fmt.endswith("_pipe"):
            kind = "a text file" if fmt == "tty" else "a still image"
            raise MediaError("video", what, f"not a video: FFmpeg reads it as {kind} (format {fmt!r})")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        return max(0, int(stream.frames or 0)), fps, bool(container.streams.audio)


def _load_audio_track(
    source: str | Path | bytes, what: str, sample_rate: int, max_seconds: float | None
) -> torch.Tensor | None:
    with _open(source, what) as container:
        try:
            data, rate = decode_audio_stream(container, what, max_seconds)
        except MediaError as exc:
            raise MediaError("video", what, f"audio track: {exc.reason}") from exc
    if data.shape[0] == 0:
        logger.warning("video %s: the audio stream has no samples; treating the video as silent", what)
        return None
    try:
        return decode_audio_array(data, rate, target_rate=sample_rate)
    except MediaError as exc:
        raise MediaError("video", what, f"audio track: {exc.reason}") from exc


def load_video(
    source: str | Path | bytes,
    max_frames: int = 64,
    *,
    frame_limit: int = 64,
    max_area: int = 480 * 480,
    min_area: int = 288 * 288,
    stride: int = 64,
    with_audio: bool = True,
    sample_rate: int = SAMPLE_RATE,
    max_audio_seconds: float | None = None,
) -> VideoClip:
    """Decode a video, sample up to ``max_frames`` frames uniformly, preprocess them, and extract its audio.

    Frames are decoded sequentially; only the sampled ones are kept, already at the processed size. The container's
    frame count is used for sampling when it has one; when it has none, or fewer (or more) frames actually decode,
    the frames are counted by decoding and sampled again over the true count.

    Args:
        source: a file path, or the encoded file's bytes.
        max_frames: frames to sample (fewer when the video is shorter).
        frame_limit: the most frames a request may ask for (``LimitsConfig.max_video_frames``).
        max_area, min_area, stride: frame geometry (``LimitsConfig.video_*``), see :func:`video_frame_size`.
        with_audio: whether to decode the audio track.
        sample_rate: rate of the returned audio in Hz.
        max_audio_seconds: refuse an audio track longer than this, before decoding all of it (None: no limit here).

    Returns:
        :class:`VideoClip` with ``frames`` [T, 3, H, W] float32 in [-1, 1] and ``audio`` [M] float32 or None.

    Raises:
        InputError: when ``max_frames`` < 1. LimitError: when ``max_frames`` > ``frame_limit``.
        MediaError: ("video", ...) for a missing, corrupt or unsupported file, no video stream, or no frames.
        LimitError: also when the audio track is longer than ``max_audio_seconds``.
    """
    if max_frames < 1:
        raise InputError(f"video max_frames must be at least 1, got {max_frames}")
    if max_frames > frame_limit:
        raise LimitError("video frames", max_frames, frame_limit, "request fewer frames (max_frames)")
    what = _describe(source)
    claimed, fps, has_audio = _stream_info(source, what)

    def convert(img: Image.Image) -> torch.Tensor:
        return process_video_frame(img, max_area=max_area, min_area=min_area, stride=stride)

    indices = sample_frame_indices(claimed, max_frames)
    kept, count, first_size = _decode_pass(source, what, set(indices), convert)
    if count == 0 or first_size is None:
        raise MediaError("video", what, "no frames could be decoded")
    if count != claimed:
        # The container's count was missing or wrong: sample again over the frames that really decode.
        if claimed:
            logger.warning("video %s: container says %d frames but %d decode; resampling", what, claimed, count)
        indices = sample_frame_indices(count, max_frames)
        if not set(indices) <= set(kept):
            kept, count2, first_size = _decode_pass(source, what, set(indices), convert)
            if count2 != count or first_size is None:
                raise MediaError("video", what, f"decoding is not repeatable ({count} then {count2} frames)")
    frames = torch.stack([kept[i] for i in indices])  # (T, 3, H, W)
    audio = _load_audio_track(source, what, sample_rate, max_audio_seconds) if with_audio and has_audio else None
    logger.debug("video %s: %d of %d frames at %s, audio=%s", what, len(indices), count, tuple(frames.shape), has_audio)
    return VideoClip(
        frames=frames,
        frame_indices=indices,
        num_source_frames=count,
        fps=fps,
        original_size=first_size,
        audio=audio,
    )
