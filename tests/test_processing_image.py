"""Ola's two-view image preprocessing: geometry, gray padding, downscaling, normalisation and decode errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ola_model.errors import InputError, MediaError
from ola_model.processing.image import (
    ImageViews,
    highres_size,
    image_to_tensor,
    load_image,
    lowres_size,
    pad_to_size,
    process_image,
)

GRAY = (127 / 255 - 0.5) / 0.5  # the padding colour after normalisation


@pytest.mark.parametrize(
    ("size", "high", "low"),
    [
        ((1000, 750), (1024, 768), (416, 320)),
        ((640, 480), (640, 480), (416, 320)),
        ((1920, 1080), (1920, 1088), (480, 288)),
        ((336, 336), (352, 352), (384, 384)),
        ((2000, 1600), (1696, 1344), (416, 320)),
        ((1, 1), (32, 32), (384, 384)),
        ((10000, 1), (10016, 32), (6784, 32)),
    ],
)
def test_view_sizes(size: tuple[int, int], high: tuple[int, int], low: tuple[int, int]) -> None:
    assert highres_size(*size) == high
    assert lowres_size(*high) == low


def test_highres_downscale_stays_within_area() -> None:
    for w, h in [(2000, 1600), (4000, 3000), (1537, 1537), (20000, 200)]:
        big_w, big_h = highres_size(w, h)
        assert big_w * big_h <= 1536 * 1536
        assert big_w % 32 == 0 and big_h % 32 == 0
        assert big_w <= w and big_h <= h


def test_geometry_parameters() -> None:
    assert highres_size(100, 100, max_area=64 * 64, stride=16) == (64, 64)
    assert lowres_size(64, 64, area=32 * 32, stride=16) == (32, 32)


@pytest.mark.parametrize("size", [(0, 10), (10, 0), (-1, 5)])
def test_empty_sizes_raise(size: tuple[int, int]) -> None:
    with pytest.raises(MediaError) as info:
        highres_size(*size)
    assert info.value.kind == "image"
    with pytest.raises(MediaError):
        lowres_size(*size)


def test_padded_small_image_has_gray_border_and_centred_content() -> None:
    views = process_image(Image.new("RGB", (336, 336), (255, 0, 0)))
    assert isinstance(views, ImageViews)
    assert views.original_size == (336, 336)
    assert views.highres.shape == (3, 352, 352) and views.highres.dtype == torch.float32
    assert views.lowres.shape == (3, 384, 384) and views.lowres.dtype == torch.float32
    assert views.highres_size == (352, 352) and views.lowres_size == (384, 384)
    # offset (352 - 336) // 2 = 8: rows/cols 0..7 are padding, 8..343 the image.
    torch.testing.assert_close(views.highres[:, 0, 0], torch.full((3,), GRAY))
    torch.testing.assert_close(views.highres[:, 7, 7], torch.full((3,), GRAY))
    torch.testing.assert_close(views.highres[:, 351, 351], torch.full((3,), GRAY))
    torch.testing.assert_close(views.highres[:, 8, 8], torch.tensor([1.0, -1.0, -1.0]))
    torch.testing.assert_close(views.highres[:, 343, 343], torch.tensor([1.0, -1.0, -1.0]))
    # The low-res view is made from the padded high-res view: its corner is gray too.
    torch.testing.assert_close(views.lowres[:, 0, 0], torch.full((3,), GRAY), atol=2e-2, rtol=0)


def test_uneven_padding_offsets() -> None:
    padded = pad_to_size(Image.new("RGB", (5, 3), (0, 0, 0)), (8, 8))
    arr = np.asarray(padded)
    # Offsets ((8 - 5) // 2, (8 - 3) // 2) = (1, 2).
    assert (arr[2:5, 1:6] == 0).all()
    assert (arr[:2] == 127).all() and (arr[5:] == 127).all()
    assert (arr[:, 0] == 127).all() and (arr[:, 6:] == 127).all()


def test_exact_multiple_is_not_padded() -> None:
    views = process_image(Image.new("RGB", (640, 480), (0, 255, 0)))
    assert views.highres.shape == (3, 480, 640)
    torch.testing.assert_close(views.highres[:, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))


def test_large_image_is_downscaled_not_padded() -> None:
    views = process_image(Image.new("RGB", (2000, 1600), (0, 0, 255)))
    _, big_h, big_w = views.highres.shape
    assert (big_w, big_h) == (1696, 1344)
    assert big_w * big_h <= 1536 * 1536
    assert views.lowres.shape == (3, 320, 416)
    torch.testing.assert_close(views.highres[:, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))
    torch.testing.assert_close(views.lowres[:, -1, -1], torch.tensor([-1.0, -1.0, 1.0]))


def test_normalisation_range_and_values() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    arr[0, 0] = 0
    arr[0, 1] = 255
    tensor = image_to_tensor(Image.fromarray(arr))
    assert tensor.shape == (3, 50, 70) and tensor.dtype == torch.float32
    assert tensor.min().item() == -1.0 and tensor.max().item() == 1.0
    expected = torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    torch.testing.assert_close(tensor, expected, atol=1e-6, rtol=0)
    # bit for bit the CLIP processor's float32 arithmetic, (x / 255 - 0.5) / 0.5, in a contiguous (3, H, W) tensor
    reference = torch.from_numpy((arr.astype(np.float32) / 255.0 - 0.5) / 0.5).permute(2, 0, 1)
    assert torch.equal(tensor, reference) and tensor.is_contiguous()
    views = process_image(Image.fromarray(arr))
    for view in (views.lowres, views.highres):
        assert view.min() >= -1.0 and view.max() <= 1.0


def test_process_image_converts_modes_and_rejects_empty() -> None:
    views = process_image(Image.new("L", (64, 64), 255))
    assert views.highres.shape == (3, 64, 64)
    torch.testing.assert_close(views.highres[:, 0, 0], torch.ones(3))
    with pytest.raises(MediaError, match="at least 1 pixel"):
        process_image(Image.new("RGB", (0, 10)))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_load_image_from_path_and_bytes(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"img.{fmt.lower()}"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(path, format=fmt)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (40, 30)
    assert load_image(str(path)).size == (40, 30)
    from_bytes = load_image(path.read_bytes())
    assert from_bytes.size == (40, 30)
    assert np.abs(np.asarray(from_bytes, dtype=int) - (10, 200, 30)).max() <= 3


def test_load_image_converts_rgba_and_palette(tmp_path: Path) -> None:
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (8, 8), (1, 2, 3, 0)).save(rgba)
    assert load_image(rgba).mode == "RGB"
    palette = tmp_path / "p.gif"
    Image.new("P", (8, 8), 3).save(palette)
    assert load_image(palette).mode == "RGB"


def test_load_image_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    text = tmp_path / "notes.txt"
    text.write_text("this is not an image\n" * 20)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    for source in (junk, text, truncated, tmp_path / "missing.png", b"", b"\x89PNG\r\n"):
        with pytest.raises(MediaError) as info:
            load_image(source)
        assert info.value.kind == "image"
        assert info.value.reason
        assert isinstance(info.value, InputError)


def test_load_image_pixel_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    with pytest.raises(MediaError, match="over the limit of 9999"):
        load_image(path, max_pixels=9999)
    assert load_image(path, max_pixels=10000).size == (100, 100)
