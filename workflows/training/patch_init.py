"""Data-driven starts for encoders trained from scratch: the ViT's patch embedding, and Whisper's first convolution,
as whitened PCA of what they see in a dataset.

The published recipe starts from a pretrained OryxViT (SigLIP) and Whisper; at tiny size neither exists.

- **ViT** (``model.init.vit_patches``): a randomly initialised tiny ViT gives the LLM tokens it does not learn to
  read: ``bench/vision_token_probe.py readout`` names a lone shape's kind from one token at 0.65 (random) against
  0.93 from the token's own pixels, and the scene questions stay at chance (``bench/scene_qa_probe.py``;
  ``ola_model/assets/demo-model/TRAINING.md``). With the patch embedding set to the top principal directions of the
  training images' patches, each scaled to unit variance, the same readout reaches 0.85 and the LLM starts to answer
  object questions.
- **Whisper** (``model.init.whisper_mels``): transformers initialises the convolutions with std 0.02, so the tiny
  Whisper's convolution stack puts out speech at an rms of 0.03 beside its position table's 0.71: what reaches the
  encoder layers is the position table plus a 4% trace of the sound, and the encoder's outputs on the speech frames
  of two different sentences differ by 3-6%. With ``conv1`` set to the whitened PCA of the dataset's log-mel windows
  (over the frames of real audio, not the 30 s chunk's padding) and ``conv2`` given a variance-preserving (He) start,
  speech comes out of the stack at an rms of 0.79, silence at 0.05, and two sentences' outputs differ by 85%.

Either is set once, before the first stage; every other weight keeps its seeded random start and all of them train as
usual.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ola_model.errors import OlaError
from ola_model.model import OlaModel
from ola_model.processing.audio import HOP_LENGTH, load_audio, process_audio
from ola_model.processing.image import load_image, process_image_within
from workflows.data.dataset import load_split
from workflows.data.errors import DataFormatError

log = logging.getLogger(__name__)

DEFAULT_IMAGES = 256  # images whose patches make the statistics (a few hundred thousand patches at tiny size)
DEFAULT_CLIPS = 200  # audio clips whose log-mel windows make Whisper's statistics (~45000 windows of speech)


class PatchInitError(OlaError, ValueError):
    """The statistics cannot be made: no dataset, no images (audio) in its train split, or fewer patches (windows)
    than the layer's width."""


def image_patches(images: list[torch.Tensor], patch: int) -> torch.Tensor:
    """Every non-overlapping ``patch`` x ``patch`` patch of (3, H, W) images (sides multiples of ``patch``):
    (N, 3 * patch * patch), channel-major as a ``Conv2d`` weight flattens."""
    rows = []
    for image in images:
        c = image.shape[0]
        grid = image.unfold(1, patch, patch).unfold(2, patch, patch)  # (3, h, w, p, p)
        rows.append(grid.permute(1, 2, 0, 3, 4).reshape(-1, c * patch * patch))
    return torch.cat(rows)


def whitened_basis(patches: torch.Tensor, width: int, floor: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``width`` principal directions of ``patches`` (N, D), each scaled to give unit variance.

    A direction whose variance is below ``floor`` times the largest one's is scaled as if it had that variance, so
    images with fewer than ``width`` independent directions (flat synthetic pictures) do not blow a direction of
    noise up (on the tiny recipe's images the 32nd direction has 1.4e-4 of the first's variance).

    Returns:
        (weight (width, D), bias (width,)) such that ``weight @ x + bias`` has zero mean over the patches and, for
        directions above the floor, unit variance, the outputs uncorrelated.
    """
    if patches.shape[0] <= width:
        raise PatchInitError(f"{patches.shape[0]} patches cannot give {width} principal directions")
    x = patches.double()
    mean = x.mean(0)
    centred = x - mean
    cov = centred.T @ centred / (x.shape[0] - 1)
    values, vectors = torch.linalg.eigh(cov)  # ascending
    values, vectors = values.flip(0)[:width], vectors.flip(1)[:, :width]
    weight = vectors.T / values.clamp(min=float(values[0]) * floor + 1e-12).sqrt()[:, None]
    # eigenvectors have an arbitrary sign; fix it (largest entry positive) so the result is reproducible
    signs = torch.sign(weight.gather(1, weight.abs().argmax(1, keepdim=True)))
    weight = weight * signs
    return weight.float(), (-(weight @ mean)).float()


def _sample_files(root: str | Path, media: str, key: str, count: int, seed: int) -> list[str]:
    """The ``media`` files (``image`` / ``audio``) of ``count`` samples drawn from the train split of a dataset, in
    the split's order. ``key`` names the config key in errors."""
    try:
        records = [r for r in load_split(root, "train") if media in r]
    except DataFormatError as exc:
        raise PatchInitError(f"model.init.{key}: {exc}") from exc
    if not records:
        raise PatchInitError(f"{root}: the train split has no {media} samples")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(records), size=min(count, len(records)), replace=False)
    return [records[i][media] for i in sorted(int(j) for j in chosen)]


def dataset_views(root: str | Path, model: OlaModel, count: int = DEFAULT_IMAGES, seed: int = 0) -> list[torch.Tensor]:
    """Both views (as the model sees them) of ``count`` images drawn from the train split of a dataset."""
    views = []
    for path in _sample_files(root, "image", "vit_patches", count, seed):
        pair = process_image_within(load_image(path), model.config.limits)
        views += [pair.lowres, pair.highres]
    return views


@torch.no_grad()
def init_patch_embedding(model: OlaModel, root: str | Path, count: int = DEFAULT_IMAGES, seed: int = 0) -> int:
    """Set ``model``'s ViT patch embedding to the whitened PCA basis of a dataset's image patches.

    Returns:
        how many patches the statistics came from.
    """
    embed = model.vision_tower.patch_embed.proj
    patch = model.vision_tower.patch_size
    patches = image_patches(dataset_views(root, model, count, seed), patch)
    weight, bias = whitened_basis(patches, embed.out_channels)
    embed.weight.copy_(weight.reshape(embed.weight.shape).to(embed.weight.dtype))
    embed.bias.copy_(bias.to(embed.bias.dtype))
    log.info("vision tower: patch embedding from the whitened PCA of %d patches of %s", patches.shape[0], root)
    return patches.shape[0]


# ---------------------------------------------------------------------------------------------------------- Whisper
def mel_windows(mels: list[torch.Tensor], kernel: int) -> torch.Tensor:
    """Every ``kernel``-frame window of log-mel spectrograms (n_mels, T): (N, n_mels * kernel), channel-major as a
    ``Conv1d`` weight (out, n_mels, kernel) flattens, one row per output frame of an unpadded convolution."""
    rows = []
    for mel in mels:
        win = mel.unfold(1, kernel, 1)  # (n_mels, T - kernel + 1, kernel)
        rows.append(win.permute(1, 0, 2).reshape(-1, mel.shape[0] * kernel))
    return torch.cat(rows)


def dataset_mels(root: str | Path, count: int = DEFAULT_CLIPS, seed: int = 0) -> list[torch.Tensor]:
    """Whisper log-mel features (n_mels, T) of ``count`` audio clips drawn from the train split of a dataset (every
    task with an ``audio`` file), cut to the frames of real audio: a short clip's 30 s chunk is mostly padding, which
    would otherwise make the statistics."""
    mels = []
    for path in _sample_files(root, "audio", "whisper_mels", count, seed):
        wav = load_audio(path)
        mel = process_audio(wav).mel  # (chunks, 3000, n_mels)
        frames = -(-int(wav.shape[0]) // HOP_LENGTH)
        mels.append(mel.reshape(-1, mel.shape[-1])[:frames].T)  # (n_mels, frames)
    return mels


@torch.no_grad()
def init_whisper_frontend(model: OlaModel, root: str | Path, count: int = DEFAULT_CLIPS, seed: int = 0) -> int:
    """Set ``model``'s Whisper ``conv1`` to the whitened PCA basis of a dataset's log-mel windows, and give ``conv2``
    a He-normal start (std sqrt(2 / fan_in), zero bias, drawn from ``seed``), so the stack keeps the speech's scale
    up to the position table.

    Returns:
        how many windows the statistics came from.
    """
    whisper = model.speech_encoder.whisper_model
    conv1, conv2 = whisper.conv1, whisper.conv2
    windows = mel_windows(dataset_mels(root, count, seed), conv1.kernel_size[0])
    weight, bias = whitened_basis(windows, conv1.out_channels)
    conv1.weight.copy_(weight.reshape(conv1.weight.shape).to(conv1.weight.dtype))
    conv1.bias.copy_(bias.to(conv1.bias.dtype))
    fan_in = conv2.in_channels * conv2.kernel_size[0]
    g = torch.Generator().manual_seed(seed)
    he = torch.randn(conv2.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5
    conv2.weight.copy_(he.to(conv2.weight.dtype))
    conv2.bias.zero_()
    log.info("whisper: conv1 from the whitened PCA of %d log-mel windows of %s, conv2 He-normal", len(windows), root)
    return windows.shape[0]
