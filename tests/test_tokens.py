"""Token-count formulas, and their agreement with the tensors that preprocessing produces."""

from __future__ import annotations

import pytest
from PIL import Image

from ola_model.errors import InputError, MediaError
from ola_model.processing.image import process_image
from ola_model.processing.video import process_video_frame, video_frame_size
from ola_model.tokens import audio_num_tokens, image_num_tokens, video_num_tokens, view_num_tokens


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [(1000, 750, 935), (640, 480, 458), (1920, 1080, 2221), (336, 336, 291)],
)
def test_image_num_tokens_examples(width: int, height: int, expected: int) -> None:
    assert image_num_tokens(width, height) == expected


def test_view_num_tokens() -> None:
    assert view_num_tokens(640, 320) == 10 * 21  # grid 40x20 -> pooled 20x10, plus a newline per row
    assert view_num_tokens(64, 32, patch=16, pool=1) == 2 * 5
    with pytest.raises(InputError):
        view_num_tokens(48, 32)


def test_video_num_tokens_examples() -> None:
    assert video_num_tokens(1920, 1080, 1) == 213  # 211 per frame + begin/end
    assert video_num_tokens(1920, 1080, 64) == 2 + 64 * 211
    assert video_num_tokens(640, 360, 1) - 2 == 253
    assert video_num_tokens(1920, 1080, 1, max_area=448 * 448, stride=32) - 2 == 191
    with pytest.raises(InputError):
        video_num_tokens(1920, 1080, 0)
    with pytest.raises(MediaError, match="aspect ratio"):
        video_num_tokens(2000, 20, 1)


def test_audio_num_tokens() -> None:
    assert audio_num_tokens(1) == 2 + 151
    assert audio_num_tokens(480000) == 2 + 151
    assert audio_num_tokens(480001) == 2 + 2 * 151
    assert audio_num_tokens(31 * 16000) == 304
    assert audio_num_tokens(480000, encoder_frames=1500, stack=5) == 2 + 301
    for bad in (0, -5):
        with pytest.raises(InputError):
            audio_num_tokens(bad)


def _pooled_view_tokens(height_px: int, width_px: int, patch: int = 16, pool: int = 2) -> int:
    rows, cols = height_px // patch // pool, width_px // patch // pool
    return rows * (cols + 1)


@pytest.mark.parametrize("size", [(1000, 750), (640, 480), (1920, 1080), (336, 336), (2000, 1600), (7, 300)])
def test_image_tensor_shapes_agree_with_token_formula(size: tuple[int, int]) -> None:
    views = process_image(Image.new("RGB", size, (10, 20, 30)))
    _, low_h, low_w = views.lowres.shape
    _, high_h, high_w = views.highres.shape
    for side in (low_h, low_w, high_h, high_w):
        assert side % 32 == 0  # whole 2x2 windows of 16-pixel patches
    assert image_num_tokens(*size) == 3 + _pooled_view_tokens(low_h, low_w) + _pooled_view_tokens(high_h, high_w)


@pytest.mark.parametrize("size", [(1920, 1080), (640, 360), (400, 300), (64, 48)])
def test_video_frame_tensor_agrees_with_frame_size_and_tokens(size: tuple[int, int]) -> None:
    frame = process_video_frame(Image.new("RGB", size))
    width, height = video_frame_size(*size)
    assert frame.shape == (3, height, width)
    assert video_num_tokens(*size, 3) == 2 + 3 * (_pooled_view_tokens(height, width) + 1)
