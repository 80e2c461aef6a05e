"""Data-driven starts of encoders trained from scratch: the ViT patch embedding from the whitened PCA of a dataset's
image patches (``model.init.vit_patches``), Whisper's first convolution from its log-mel windows
(``model.init.whisper_mels``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ola_model import OlaConfig, build_model
from ola_model.checkpoint.ola_format import load_checkpoint
from workflows.training.config import ConfigError, config_from_dict
from workflows.training.patch_init import (
    PatchInitError,
    dataset_mels,
    dataset_views,
    image_patches,
    init_patch_embedding,
    init_whisper_frontend,
    mel_windows,
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


def test_a_stage_starts_from_the_data_driven_inits(data_root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(data_root.parent)
    # relative to the working directory
    config = _config(data_root, {"vit_patches": data_root.name, "whisper_mels": data_root.name})
    result = run_stage(config, "s", tmp_path, progress=False)
    trained = load_checkpoint(result.model_dir)  # the ViT and Whisper are frozen in this stage
    expected = build_model(OlaConfig.from_name("tiny"), seed=0)
    init_patch_embedding(expected, data_root)
    init_whisper_frontend(expected, data_root)
    assert torch.equal(trained.vision_tower.patch_embed.proj.weight, expected.vision_tower.patch_embed.proj.weight)
    assert torch.equal(trained.vision_tower.patch_embed.proj.bias, expected.vision_tower.patch_embed.proj.bias)
    for name in ("conv1", "conv2"):
        ours = getattr(trained.speech_encoder.whisper_model, name)
        theirs = getattr(expected.speech_encoder.whisper_model, name)
        assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias), name


def test_a_missing_dataset_is_named(tmp_path: Path) -> None:
    model = build_model(OlaConfig.from_name("tiny"), seed=0)
    with pytest.raises(PatchInitError, match=r"model\.init\.vit_patches: .*nowhere: no manifest\.json"):
        init_patch_embedding(model, tmp_path / "nowhere")


def test_vit_and_vit_patches_exclude_each_other(data_root: Path) -> None:
    with pytest.raises(ConfigError, match="vit and vit_patches both set"):
        _config(data_root, {"vit": "x.pth", "vit_patches": str(data_root)})


def test_mel_windows_are_what_the_first_convolution_sees() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(8, 4, kernel_size=3)
    mels = [torch.randn(8, 20), torch.randn(8, 5)]
    windows = mel_windows(mels, 3)
    assert windows.shape == (18 + 3, 8 * 3)
    expected = torch.cat([conv(m[None])[0].T for m in mels])
    assert torch.allclose(windows @ conv.weight.reshape(4, -1).T + conv.bias, expected, atol=1e-5)


def _stack_rms(model, mels: list[torch.Tensor]) -> float:
    """RMS of Whisper's convolution stack on real audio frames, relative to its position table's."""
    whisper = model.speech_encoder.whisper_model
    act = torch.nn.functional.gelu
    with torch.no_grad():
        out = torch.cat([act(whisper.conv2(act(whisper.conv1(m[None]))))[0].T for m in mels])
    return float(out.pow(2).mean().sqrt() / whisper.embed_positions.weight.pow(2).mean().sqrt())


def test_init_whisper_frontend_whitens_conv1_and_keeps_the_sound_up(data_root: Path) -> None:
    model = build_model(OlaConfig.from_name("tiny"), seed=0)
    mels = dataset_mels(data_root)
    assert len(mels) >= 2 and all(m.shape[0] == 128 and 50 < m.shape[1] < 300 for m in mels)  # real frames only
    before = _stack_rms(model, mels)
    n = init_whisper_frontend(model, data_root)
    conv1, conv2 = model.speech_encoder.whisper_model.conv1, model.speech_encoder.whisper_model.conv2
    windows = mel_windows(mels, 3)
    assert windows.shape[0] == n
    with torch.no_grad():
        out = torch.cat([conv1(m[None])[0].T for m in mels])  # padding 1: the unpadded windows plus 2 per clip
        whitened = (windows @ conv1.weight.reshape(conv1.out_channels, -1).T + conv1.bias).double()
    assert out.shape[0] == n + 2 * len(mels)
    assert whitened.mean(0).abs().max() < 1e-3
    variances = whitened.var(0)
    # pure tones: the directions that carry variance come out at unit variance, the rest below it
    assert torch.allclose(variances[:2], torch.ones(2, dtype=torch.float64), atol=1e-3)
    assert (variances <= 1.0 + 1e-3).all()
    assert abs(float(conv2.weight.std()) / (2 / (32 * 3)) ** 0.5 - 1) < 0.1 and not conv2.bias.any()
    # transformers' std-0.02 start leaves the sound a trace beside the position table; this one does not
    assert before < 0.1
    assert _stack_rms(model, mels) > 0.3


def test_whisper_mels_names_a_missing_dataset_and_excludes_whisper(data_root: Path, tmp_path: Path) -> None:
    model = build_model(OlaConfig.from_name("tiny"), seed=0)
    with pytest.raises(PatchInitError, match=r"model\.init\.whisper_mels: .*nowhere: no manifest\.json"):
        init_whisper_frontend(model, tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="whisper and whisper_mels both set"):
        _config(data_root, {"whisper": "w.pt", "whisper_mels": str(data_root)})
