"""How many LLM positions each input occupies (``ola-architecture.md`` §2.4, §2.5, §3.5, §9).

These are pure functions of sizes, so a gateway can check a request against ``LimitsConfig.max_context`` before any
pixels or samples are decoded. They agree with the shapes made by ``ola_model.processing``:

- image: ``image_begin`` + low-res rows + ``image_sep`` + high-res rows + ``image_end``, where each view of grid
  h x w (pixels / 16) pools 2x2 to (h/2) rows of (w/2) tokens plus a row newline;
- video: ``image_begin`` + per frame (pooled rows with newlines + ``image_sep``) + ``image_end``;
- audio: ``speech_begin`` + per 30 s chunk (1500 encoder frames / 10 stacked + ``speech_newline``) + ``speech_end``.
"""

from __future__ import annotations

from ola_model.errors import InputError
from ola_model.processing.image import highres_size, lowres_size
from ola_model.processing.video import video_frame_size


def view_num_tokens(width: int, height: int, patch: int = 16, pool: int = 2) -> int:
    """Tokens of one pooled view of ``width`` x ``height`` pixels: (h/pool) rows of (w/pool + 1), grid = pixels/patch.

    Raises:
        InputError: when the view is not a whole number of pooling windows of patches.
    """
    window = patch * pool
    if width < window or height < window or width % window or height % window:
        raise InputError(f"view size {width}x{height} is not a positive multiple of patch*pool = {window} pixels")
    rows, cols = height // window, width // window
    return rows * (cols + 1)


def image_num_tokens(
    width: int,
    height: int,
    *,
    max_area: int = 1536 * 1536,
    lowres_area: int = 384 * 384,
    stride: int = 32,
    patch: int = 16,
    pool: int = 2,
) -> int:
    """LLM positions of one image of ``width`` x ``height`` pixels: 3 + low-res view tokens + high-res view tokens.

    Example: a 1000x750 image (high-res 1024x768, low-res 416x320) costs 935 positions.
    """
    hi_w, hi_h = highres_size(width, height, max_area=max_area, stride=stride)
    lo_w, lo_h = lowres_size(hi_w, hi_h, area=lowres_area, stride=stride)
    return 3 + view_num_tokens(lo_w, lo_h, patch, pool) + view_num_tokens(hi_w, hi_h, patch, pool)


def video_num_tokens(
    width: int,
    height: int,
    num_frames: int,
    *,
    max_area: int = 480 * 480,
    min_area: int = 288 * 288,
    stride: int = 64,
    patch: int = 16,
    pool: int = 2,
) -> int:
    """LLM positions of ``num_frames`` sampled frames of a ``width`` x ``height`` video: 2 + T * (frame tokens + 1).

    Example: a 1920x1080 video has 640x320 frames of 210 + 1 positions each; 1 frame costs 213.

    Raises:
        InputError: when ``num_frames`` < 1. MediaError: for a frame size that cannot be processed.
    """
    if num_frames < 1:
        raise InputError(f"video num_frames must be at least 1, got {num_frames}")
    frame_w, frame_h = video_frame_size(width, height, max_area=max_area, min_area=min_area, stride=stride)
    return 2 + num_frames * (view_num_tokens(frame_w, frame_h, patch, pool) + 1)


def audio_num_tokens(
    num_samples: int,
    *,
    chunk_samples: int = 480000,
    encoder_frames: int = 1500,
    stack: int = 10,
) -> int:
    """LLM positions of ``num_samples`` samples of 16 kHz audio: 2 + chunks * (encoder_frames // stack + 1).

    Every started 30 s chunk costs the full 151 positions (short clips are zero-padded to 30 s).

    Args:
        num_samples: length of the 16 kHz mono waveform.
        chunk_samples: samples per chunk (30 s).
        encoder_frames: fused encoder frames per chunk (Whisper's 1500).
        stack: frames stacked by the speech projector (``ProjectorConfig.speech_ds_rate``).

    Raises:
        InputError: when ``num_samples`` < 1 (empty audio).
    """
    if num_samples < 1:
        raise InputError(f"audio num_samples must be at least 1, got {num_samples} (empty audio)")
    num_chunks = -(-num_samples // chunk_samples)
    return 2 + num_chunks * (encoder_frames // stack + 1)
