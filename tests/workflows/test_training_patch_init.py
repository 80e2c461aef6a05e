"""The ViT patch embedding from the whitened PCA of a dataset's image patches (``model.init.vit_patches``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ola_model import OlaConfig, build_model
from ola_model.checkpoint.ola_format import load_checkpoint
from workflows.training.config import ConfigError, config_from_dict
from workflows.training.patch_init import (
    PatchInitError,
    dataset_views,
    image_patches,
    init_patch_embedding,
    whitened_basis,
)
from workflows.training.stage import run_stage

pytestmark = pytest.mark.usefixtures("process_group")


def test_patches_are_what_the_patch_convolution_sees() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, kernel_size=16, stride=16)
    images = [torch.randn(3, 64, 96), torch.randn(3, 32, 32)]
    patches = image_patches(images, 16)
    assert patches.shape == (4 * 6 + 2 * 2, 3 * 16 * 16)
    expected = torch.cat([conv(im[None])[0].flatten(1).T for im in images])  # row-major over each grid
    got = patches @ conv.weight.reshape(8, -1).T + conv.bias
    assert torch.allclose(got, expected, atol=1e-4)


def test_whitened_basis_decorrelates_to_unit_variance() -> None:
    torch.manual_seed(0)
    mixing = torch.randn(48, 48) * torch.linspace(3.0, 0.1, 48)  # correlated, unequal variances
    patches = torch.randn(20000, 48) @ mixing.T + 5.0
    weight, bias = whitened_basis(patches, 16)
    out = (patches @ weight.T + bias).double()
    assert out.mean(0).abs().max() < 1e-3
    assert torch.allclose(torch.cov(out.T), torch.eye(16, dtype=torch.float64), atol=1e-3)
    # the same patches give the same basis: eigenvector signs are fixed, not left to the solver
    assert torch.equal(weight, whitened_basis(patches.clone(), 16)[0])
    with pytest.raises(PatchInitError, match="16 patches cannot give 16 principal directions"):
        whitened_basis(patches[:16], 16)


def test_flat_pictures_do_not_blow_noise_up() -> None:
    torch.manual_seed(0)
    patches = torch.randn(5000, 2) @ torch.randn(2, 48)  # two directions of variance, 46 of none
    weight, _ = whitened_basis(patches, 8)
    top = weight[0].norm()
    assert weight.norm(dim=1).max() <= top * (1e5**0.5) * 1.01  # the floor: 1e-5 of the top variance


def test_init_patch_embedding_whitens_the_dataset_patches(data_root: Path) -> None:
    model = build_model(OlaConfig.from_name("tiny"), seed=0)
    before = model.vision_tower.patch_embed.proj.weight.clone()
    n = init_patch_embedding(model, data_root, count=4)
    views = dataset_views(data_root, model, count=4)
    assert len(views) == 8  # both views of 4 images
    conv = model.vision_tower.patch_embed.proj
    with torch.no_grad():
        out = torch.cat([conv(v[None])[0].flatten(1).T for v in views]).double()
    assert out.shape[0] == n
    assert out.mean(0).abs().max() < 1e-3
    assert not torch.equal(before, conv.weight)
    variances = out.var(0)
    # flat synthetic pictures: the directions that carry variance come out at unit variance, the rest below it
    assert torch.allclose(variances[:4], torch.ones(4, dtype=torch.float64), atol=1e-3)
    assert (variances <= 1.0 + 1e-3).all()


def _config(data_root: Path, init: dict) -> object:
    stage = {"name": "s", "trainable": ["mm_projector"], "data": {"image_qa": 1.0}, "steps": 1, "batch_size": 2,
             "max_length": 2048, "max_video_frames": 4, "save_every": 100}  # fmt: skip
    return config_from_dict({
        "name": "patch-init",
        "model": {"preset": "tiny", "init": init},
        "data": {"root": str(data_root)},
        "stages": [stage],
    })  # fmt: skip


def test_a_stage_starts_from_the_patch_basis(data_root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(data_root.parent)
    config = _config(data_root, {"vit_patches": data_root.name})  # relative to the working directory
    result = run_stage(config, "s", tmp_path, progress=False)
    trained = load_checkpoint(result.model_dir).vision_tower.patch_embed.proj  # the ViT is frozen in this stage
    expected = build_model(OlaConfig.from_name("tiny"), seed=0)
    init_patch_embedding(expected, data_root)
    assert torch.equal(trained.weight, expected.vision_tower.patch_embed.proj.weight)
    assert torch.equal(trained.bias, expected.vision_tower.patch_embed.proj.bias)


def test_a_missing_dataset_is_named(tmp_path: Path) -> None:
    model = build_model(OlaConfig.from_name("tiny"), seed=0)
    with pytest.raises(PatchInitError, match=r"model\.init\.vit_patches: .*nowhere: no manifest\.json"):
        init_patch_embedding(model, tmp_path / "nowhere")


def test_vit_and_vit_patches_exclude_each_other(data_root: Path) -> None:
    with pytest.raises(ConfigError, match="vit and vit_patches both set"):
        _config(data_root, {"vit": "x.pth", "vit_patches": str(data_root)})
