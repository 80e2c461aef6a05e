"""Ola's two-view image preprocessing (reference ``ola-architecture.md`` §2.1, §2.3).

Every image becomes two views, both normalised to [-1, 1] in CHW float32:

- a **high-res** view: downscaled to at most ``max_area`` pixels (sides floored to multiples of ``stride``), or, when
  already small enough, gray-padded (RGB 127) up to the next multiple of ``stride`` on each side, never upscaled;
- a **low-res** view: the high-res view (after padding) resized to about ``lowres_area`` pixels (may upscale).

The geometry lives in plain-integer functions (:func:`highres_size`, :func:`lowres_size`) so token counts can be
computed without pixels (``ola_model.tokens``).
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    from ola_model.config import LimitsConfig

from ola_model.errors import MediaError

logger = logging.getLogger(__name__)

PAD_VALUE = (127, 127, 127)  # gray used for padding images and video frames
# Pillow's own threshold for decompression-bomb warnings; beyond it we refuse the image.
DEFAULT_MAX_PIXELS = 89_478_485


@dataclass
class ImageViews:
    """The two normalised views of one image.

    Attributes:
        lowres: [3, h, w] float32 in [-1, 1]; h, w multiples of the stride (32).
        highres: [3, H, W] float32 in [-1, 1]; H, W multiples of the stride (32).
        original_size: (width, height) of the input image in pixels.
    """

    lowres: torch.Tensor
    highres: torch.Tensor
    original_size: tuple[int, int]

    @property
    def lowres_size(self) -> tuple[int, int]:
        """(width, height) of the low-res view."""
        return int(self.lowres.shape[2]), int(self.lowres.shape[1])

    @property
    def highres_size(self) -> tuple[int, int]:
        """(width, height) of the high-res view."""
        return int(self.highres.shape[2]), int(self.highres.shape[1])


def _check_size(width: int, height: int, what: str) -> None:
    if width < 1 or height < 1:
        raise MediaError("image", what, f"size {width}x{height} is empty; both sides must be at least 1 pixel")


def _scaled_side(side: int, scale: float, stride: int) -> int:
    """floor(side * scale / stride) * stride, at least ``stride``."""
    return max(stride, int(side * scale / stride) * stride)


def _padded_side(side: int, stride: int) -> int:
    """The next multiple of ``stride`` at or above ``side``."""
    return -(-side // stride) * stride


def highres_size(width: int, height: int, max_area: int = 1536 * 1536, stride: int = 32) -> tuple[int, int]:
    """Size of the high-res view of a ``width`` x ``height`` image.

    Over ``max_area`` pixels the image is scaled down by sqrt(max_area / (w*h)) and each side floored to a multiple of
    ``stride`` (at least ``stride``); otherwise each side is padded up to the next multiple of ``stride``.

    Returns:
        (W, H), both multiples of ``stride``.
    """
    _check_size(width, height, f"of size {width}x{height}")
    if width * height > max_area:
        scale = math.sqrt(max_area / (width * height))
        return _scaled_side(width, scale, stride), _scaled_side(height, scale, stride)
    return _padded_side(width, stride), _padded_side(height, stride)


def lowres_size(width: int, height: int, area: int = 384 * 384, stride: int = 32) -> tuple[int, int]:
    """Size of the low-res view, computed from the *high-res* view's size ``width`` x ``height``.

    Both sides are scaled by sqrt(area / (W*H)) (this may upscale) and floored to a multiple of ``stride``, at least
    ``stride``.

    Returns:
        (w, h), both multiples of ``stride``.
    """
    _check_size(width, height, f"view of size {width}x{height}")
    scale = math.sqrt(area / (width * height))
    return _scaled_side(width, scale, stride), _scaled_side(height, scale, stride)


def _describe(source: str | Path | bytes) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return str(source)


def load_image(source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image (any format Pillow reads) as RGB.

    Like the official pipeline, EXIF orientation is not applied, and an animated image gives its first frame.

    Args:
        source: a file path, or the encoded file's bytes.
        max_pixels: images with more pixels than this are refused (decompression-bomb guard).

    Returns:
        An RGB ``PIL.Image``.

    Raises:
        MediaError: ("image", ...) when the file is missing, corrupt, unsupported, empty or too large.
    """
    what = _describe(source)
    try:
        fp = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else Path(source)
        with warnings.catch_warnings():
            # Pillow warns between MAX_IMAGE_PIXELS and twice that; we decide with our own limit below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                width, height = img.size
                _check_size(width, height, what)
                if width * height > max_pixels:
                    raise MediaError(
                        "image", what, f"{width}x{height} = {width * height} pixels is over the limit of {max_pixels}"
                    )
                rgb = img.convert("RGB")  # forces the full decode while the file is open
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:
        raise MediaError("image", what, f"too many pixels (decompression bomb guard): {exc}") from exc
    except FileNotFoundError as exc:
        raise MediaError("image", what, "file not found") from exc
    except UnidentifiedImageError as exc:
        raise MediaError("image", what, "not a recognised image format") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # Pillow reports truncated / corrupt data as OSError (and a few decoders as ValueError or SyntaxError).
        raise MediaError("image", what, f"cannot decode image: {exc}") from exc
    return rgb


def pad_to_size(img: Image.Image, size: tuple[int, int], fill: tuple[int, int, int] = PAD_VALUE) -> Image.Image:
    """Centre ``img`` on a ``size`` = (W, H) canvas of colour ``fill`` (paste offset ((W-w)//2, (H-h)//2))."""
    if img.size == size:
        return img
    width, height = img.size
    canvas = Image.new("RGB", size, fill)
    canvas.paste(img, ((size[0] - width) // 2, (size[1] - height) // 2))
    return canvas


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """Convert a PIL image to the model's pixel layout.

    x / 255, then (x - 0.5) / 0.5 (the CLIP processor with mean = std = 0.5, no resize or crop).

    Returns:
        [3, H, W] float32 in [-1, 1].
    """
    pixels = torch.from_numpy(np.array(img.convert("RGB")))  # (H, W, 3) uint8
    x = pixels.permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format)  # (3, H, W)
    return x.div_(255.0).sub_(0.5).div_(0.5)  # the same float32 operations, in place


def process_image(
    img: Image.Image,
    max_area: int = 1536 * 1536,
    lowres_area: int = 384 * 384,
    stride: int = 32,
) -> ImageViews:
    """Make Ola's low-res and high-res views of one image.

    Args:
        img: a PIL image (converted to RGB here).
        max_area: pixel budget of the high-res view (``LimitsConfig.max_image_area``).
        lowres_area: pixel budget of the low-res view (``LimitsConfig.lowres_area``).
        stride: side multiple of both views (``LimitsConfig.image_stride``).

    Returns:
        :class:`ImageViews` with ``lowres`` [3, h, w] and ``highres`` [3, H, W], float32 in [-1, 1].

    Raises:
        MediaError: when the image has a side smaller than 1 pixel.
    """
    width, height = img.size
    _check_size(width, height, "input")
    img = img.convert("RGB")
    hi_size = highres_size(width, height, max_area=max_area, stride=stride)
    if width * height > max_area:
        high = img.resize(hi_size, Image.Resampling.BICUBIC)
    else:
        high = pad_to_size(img, hi_size)
    lo_size = lowres_size(*hi_size, area=lowres_area, stride=stride)
    low = high.resize(lo_size, Image.Resampling.BICUBIC)
    logger.debug("image %dx%d -> high-res %s, low-res %s", width, height, hi_size, lo_size)
    return ImageViews(lowres=image_to_tensor(low), highres=image_to_tensor(high), original_size=(width, height))


def process_image_within(img: Image.Image, limits: LimitsConfig) -> ImageViews:
    """:func:`process_image` under a model's limits (``OlaConfig.limits``): high-res budget, low-res area, stride."""
    return process_image(
        img, max_area=limits.max_image_area, lowres_area=limits.lowres_area, stride=limits.image_stride
    )
