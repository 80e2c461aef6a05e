"""A data-driven start for a vision tower trained from scratch: the patch embedding as whitened PCA of image patches.

The published recipe starts from a pretrained OryxViT (SigLIP); at tiny size none exists, and a randomly initialised
tiny ViT gives the LLM tokens it does not learn to read: ``bench/vision_token_probe.py readout`` names a lone shape's
kind from one token at 0.65 (random) against 0.93 from the token's own pixels, and the scene questions stay at chance
(``bench/scene_qa_probe.py``; ``ola_model/assets/demo-model/TRAINING.md``). With the patch embedding set to the top
principal directions of the training images' patches, each scaled to unit variance, the same readout reaches 0.85
and the LLM starts to answer object questions. It is set once, before the first stage (``model.init.vit_patches``
in a training config); every other weight keeps its seeded random start and all of them train as usual.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ola_model.errors import OlaError
from ola_model.model import OlaModel
from ola_model.processing.image import load_image, process_image_within
from workflows.data.dataset import load_split
from workflows.data.errors import DataFormatError

log = logging.getLogger(__name__)

DEFAULT_IMAGES = 256  # images whose patches make the statistics (a few hundred thousand patches at tiny size)


class PatchInitError(OlaError, ValueError):
    """The patch statistics cannot be made: no dataset, no images in its train split, or fewer patches than the
    embedding's width."""


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


def dataset_views(root: str | Path, model: OlaModel, count: int = DEFAULT_IMAGES, seed: int = 0) -> list[torch.Tensor]:
    """Both views (as the model sees them) of ``count`` images drawn from the train split of a dataset."""
    try:
        records = [r for r in load_split(root, "train") if "image" in r]
    except DataFormatError as exc:
        raise PatchInitError(f"model.init.vit_patches: {exc}") from exc
    if not records:
        raise PatchInitError(f"{root}: the train split has no image samples")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(records), size=min(count, len(records)), replace=False)
    views = []
    for i in sorted(int(j) for j in chosen):
        pair = process_image_within(load_image(records[i]["image"]), model.config.limits)
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
