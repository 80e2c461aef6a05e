"""Component checkpoints stage-1 training starts from (``ola_model.checkpoint.components``).

Each family is written in its published layout at toy size (an HF Qwen2 directory, a BEATs ``.pt``, a timm-style
OryxViT ``.pth``, an HF Whisper directory), loaded strictly into a differently seeded tiny OlaModel, and checked for
equal weights / outputs, the report, and loud failures naming the offending key, field or path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Qwen2ForCausalLM, WhisperForConditionalGeneration

from ola_model.audio_encoder import whisper_hf_config
from ola_model.beats import Beats
from ola_model.checkpoint.components import (
    SINGLE_FILE,
    load_beats,
    load_components,
    load_qwen,
    load_vit,
    load_whisper,
)
from ola_model.checkpoint.strict import named_tensors
from ola_model.config import OlaConfig
from ola_model.errors import CheckpointError
from ola_model.model import build_model, qwen2_config
from ola_model.vision import OryxViT

Loader = Callable[..., object]
REL_BIAS = "encoder.layers.{}.self_attn.relative_attention_bias.weight"


@pytest.fixture(scope="module")
def tiny() -> OlaConfig:
    return OlaConfig.from_name("tiny")


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _equal_state(module: nn.Module, want: dict[str, torch.Tensor]) -> bool:
    got = module.state_dict()
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# ------------------------------------------------------------------------------------------- Qwen2 directories
def _qwen_ref(tiny: OlaConfig, seed: int = 10, **overrides: object) -> Qwen2ForCausalLM:
    hf = qwen2_config(dataclasses.replace(tiny.llm, **overrides))
    torch.manual_seed(seed)
    ref = Qwen2ForCausalLM(hf).eval()
    with torch.no_grad():  # norm weights and biases away from their 1 / 0 defaults
        for name, p in ref.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return ref


def test_qwen_tied_embeddings_dir_fills_lm_head(tiny: OlaConfig, tmp_path: Path) -> None:
    ref = _qwen_ref(tiny, tie_word_embeddings=True)
    ref.save_pretrained(tmp_path)
    with safe_open(tmp_path / SINGLE_FILE, "pt") as f:
        assert "lm_head.weight" not in f.keys()  # a tied model stores its embeddings once
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is True

    ola = build_model(tiny, seed=1)  # Ola's head is untied: it gets its own copy
    report = load_qwen(ola, tmp_path)
    assert report.loaded == len(named_tensors(ola.llm))
    head, emb = ola.llm.lm_head.weight, ola.llm.model.embed_tokens.weight
    assert head.data_ptr() != emb.data_ptr()
    assert torch.equal(head, emb)
    assert torch.equal(emb, ref.model.embed_tokens.weight)

    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ola.llm(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-6, atol=1e-6)


def test_qwen_config_dims_mismatch_names_the_field(tiny: OlaConfig, tmp_path: Path) -> None:
    _qwen_ref(tiny, intermediate_size=96).save_pretrained(tmp_path)
    ola = build_model(tiny, seed=1)
    before = _snapshot(ola.llm)
    with pytest.raises(CheckpointError, match=r"intermediate_size=96 \(model needs 128\)") as exc:
        load_qwen(ola, tmp_path)
    assert str(tmp_path) in str(exc.value)
    assert _equal_state(ola.llm, before)


def test_qwen_missing_tensor_is_listed(tiny: OlaConfig, tmp_path: Path) -> None:
    _qwen_ref(tiny).save_pretrained(tmp_path)
    state = load_file(tmp_path / SINGLE_FILE)
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, tmp_path / SINGLE_FILE, metadata={"format": "pt"})

    ola = build_model(tiny, seed=1)
    before = _snapshot(ola.llm)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight") as exc:
        load_qwen(ola, tmp_path)
    assert exc.value.missing == ["model.layers.1.mlp.down_proj.weight"]
    assert exc.value.unexpected == [] and exc.value.mismatched == []
    assert _equal_state(ola.llm, before)  # strict: nothing is read when any key is wrong


def test_qwen_tied_dir_without_embeddings_is_a_checkpoint_error(tiny: OlaConfig, tmp_path: Path) -> None:
    _qwen_ref(tiny, tie_word_embeddings=True).save_pretrained(tmp_path)
    state = load_file(tmp_path / SINGLE_FILE)
    del state["model.embed_tokens.weight"]
    save_file(state, tmp_path / SINGLE_FILE, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as exc:
        load_qwen(build_model(tiny, seed=1), tmp_path)
    assert "model.embed_tokens.weight" in exc.value.missing


# ------------------------------------------------------------------------------------------------- BEATs .pt
def _beats_source(tiny: OlaConfig, seed: int = 20) -> Beats:
    torch.manual_seed(seed)
    model = Beats.from_config(tiny.beats).eval()
    with torch.no_grad():  # non-trivial gates, norms and biases, so every loaded tensor matters
        for name, p in model.named_parameters():
            if "grep" in name or "layer_norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _beats_cfg(tiny: OlaConfig) -> dict[str, object]:
    """The original BEATs ``cfg`` entry for the tiny sizes (its field names)."""
    b = tiny.beats
    return {
        "input_patch_size": b.patch_size,
        "embed_dim": b.embed_dim,
        "conv_bias": False,
        "encoder_layers": b.encoder_layers,
        "encoder_embed_dim": b.encoder_embed_dim,
        "encoder_ffn_embed_dim": b.encoder_ffn_embed_dim,
        "encoder_attention_heads": b.encoder_attention_heads,
        "activation_fn": "gelu",
        "layer_norm_first": b.layer_norm_first,
        "deep_norm": b.deep_norm,
        "conv_pos": b.conv_pos,
        "conv_pos_groups": b.conv_pos_groups,
        "relative_position_embedding": True,
        "num_buckets": b.num_buckets,
        "max_distance": b.max_distance,
        "gru_rel_pos": b.gru_rel_pos,
        "finetuned_model": True,
        "predictor_class": b.num_classes,
    }


def _beats_state_with_copies(source: Beats) -> dict[str, torch.Tensor]:
    """The original's layout: the shared relative bias stored under every layer."""
    state = dict(source.state_dict())
    shared = state[REL_BIAS.format(0)]
    for i in range(1, source.encoder_layers):
        state[REL_BIAS.format(i)] = shared.clone()
    return state


def _save_beats(path: Path, tiny: OlaConfig, state: dict[str, torch.Tensor], **cfg: object) -> Path:
    torch.save({"cfg": _beats_cfg(tiny) | cfg, "model": state}, path)
    return path


def test_beats_pt_with_per_layer_bias_copies_loads(tiny: OlaConfig, tmp_path: Path) -> None:
    source = _beats_source(tiny)
    state = _beats_state_with_copies(source)
    assert REL_BIAS.format(tiny.beats.encoder_layers - 1) in state
    path = _save_beats(tmp_path / "beats.pt", tiny, state)

    ola = build_model(tiny, seed=1)
    report = load_beats(ola, path)
    assert report.loaded == len(source.state_dict())
    beats = ola.speech_encoder.beats_model
    assert _equal_state(beats, source.state_dict())

    fbank = torch.randn(2, 48, tiny.beats.num_mel_bins, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = source(fbank)
        got = beats(fbank)
    assert got.shape == (2, 3 * 8, tiny.beats.encoder_embed_dim)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_beats_pt_with_a_differing_bias_copy_fails(tiny: OlaConfig, tmp_path: Path) -> None:
    state = _beats_state_with_copies(_beats_source(tiny))
    state[REL_BIAS.format(1)] = state[REL_BIAS.format(1)] + 1e-3
    path = _save_beats(tmp_path / "beats.pt", tiny, state)
    ola = build_model(tiny, seed=1)
    before = _snapshot(ola.speech_encoder.beats_model)
    with pytest.raises(CheckpointError, match=re.escape(REL_BIAS.format(1))):
        load_beats(ola, path)
    assert _equal_state(ola.speech_encoder.beats_model, before)


def test_beats_pt_with_an_unexpected_key_fails(tiny: OlaConfig, tmp_path: Path) -> None:
    state = dict(_beats_source(tiny).state_dict()) | {"encoder.extra_proj.weight": torch.zeros(4, 4)}
    path = _save_beats(tmp_path / "beats.pt", tiny, state)
    with pytest.raises(CheckpointError, match=r"encoder\.extra_proj\.weight") as exc:
        load_beats(build_model(tiny, seed=1), path)
    assert exc.value.unexpected == ["encoder.extra_proj.weight"]
    assert exc.value.missing == [] and exc.value.mismatched == []


def test_beats_pt_cfg_mismatch_names_the_field(tiny: OlaConfig, tmp_path: Path) -> None:
    path = _save_beats(tmp_path / "beats.pt", tiny, dict(_beats_source(tiny).state_dict()), encoder_layers=12)
    with pytest.raises(CheckpointError, match=r"encoder_layers=12 \(model needs 2\)"):
        load_beats(build_model(tiny, seed=1), path)


# ----------------------------------------------------------------------------------------------- OryxViT .pth
def _vit_source(tiny: OlaConfig, seed: int = 30) -> OryxViT:
    tower = build_model(tiny, seed=seed).vision_tower
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return tower


def _timm_state(tower: OryxViT) -> dict[str, torch.Tensor]:
    """A timm-style checkpoint: the tower plus the final norm and classifier head OryxViT does not use."""
    C = tower.dim
    return dict(tower.state_dict()) | {
        "norm.weight": torch.ones(C),
        "norm.bias": torch.zeros(C),
        "head.weight": torch.randn(10, C),
    }


@pytest.mark.parametrize(
    ("wrapper", "prefix"),
    [("state_dict", ""), (None, "module."), ("state_dict", "module.")],
    ids=["wrapped", "prefixed", "both"],
)
def test_vit_pth_loads_and_reports_dropped_keys(
    tiny: OlaConfig, tmp_path: Path, wrapper: str | None, prefix: str
) -> None:
    source = _vit_source(tiny)
    state = {prefix + k: v for k, v in _timm_state(source).items()}
    torch.save({wrapper: state} if wrapper else state, tmp_path / "vit.pth")

    ola = build_model(tiny, seed=1)
    report = load_vit(ola, tmp_path / "vit.pth")
    assert report.loaded == len(source.state_dict())
    assert set(report.skipped) == {"norm.weight", "norm.bias", "head.weight"}
    assert all(reason for reason in report.skipped.values())
    assert report.notes == []
    assert _equal_state(ola.vision_tower, source.state_dict())

    image = torch.randn(3, 64, 48, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ola.vision_tower([image])[0], source([image])[0], rtol=0, atol=0)


def _bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D linear interpolation with half-pixel centres (align_corners=False)."""
    A = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(src), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        A[i, i0] += 1.0 - frac
        A[i, i1] += frac
    return A


def test_vit_pth_smaller_pos_grid_is_resized(tiny: OlaConfig, tmp_path: Path) -> None:
    old, grid, C = 8, tiny.vision.pos_grid, tiny.vision.hidden_size
    state = _timm_state(_vit_source(tiny))
    small = torch.randn(1, old * old, C, generator=torch.Generator().manual_seed(6))
    state["pos_embed"] = small
    torch.save(state, tmp_path / "vit.pth")

    ola = build_model(tiny, seed=1)
    report = load_vit(ola, tmp_path / "vit.pth")
    assert any("pos_embed" in note and f"{old}x{old}" in note and f"{grid}x{grid}" in note for note in report.notes)

    A = _bilinear_matrix(old, grid)  # separable: rows then columns
    want = torch.einsum("ij,kl,jlc->ikc", A, A, small.double().reshape(old, old, C)).reshape(1, grid * grid, C)
    torch.testing.assert_close(ola.vision_tower.pos_embed.double(), want, rtol=1e-6, atol=1e-6)


def test_vit_pth_with_patch_14_fails_naming_the_key(tiny: OlaConfig, tmp_path: Path) -> None:
    state = _timm_state(_vit_source(tiny))
    state["patch_embed.proj.weight"] = torch.randn(tiny.vision.hidden_size, 3, 14, 14)
    torch.save({"state_dict": state}, tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match=r"patch_embed\.proj\.weight") as exc:
        load_vit(build_model(tiny, seed=1), tmp_path / "vit.pth")
    assert [key for key, _, _ in exc.value.mismatched] == ["patch_embed.proj.weight"]
    assert exc.value.mismatched[0][1] == (tiny.vision.hidden_size, 3, 14, 14)


# ------------------------------------------------------------------------------------------- load_components
def _write_all(tiny: OlaConfig, root: Path) -> tuple[dict[str, Path], dict[str, dict[str, torch.Tensor]]]:
    """Every component checkpoint on disk, and the state each part must end up with."""
    paths = {name: root / name for name in ("llm", "whisper")}
    qwen = _qwen_ref(tiny)
    qwen.save_pretrained(paths["llm"])
    torch.manual_seed(40)
    whisper = WhisperForConditionalGeneration(whisper_hf_config(tiny.whisper))
    whisper.save_pretrained(paths["whisper"])
    beats = _beats_source(tiny)
    paths["beats"] = _save_beats(root / "beats.pt", tiny, _beats_state_with_copies(beats))
    vit = _vit_source(tiny)
    paths["vit"] = root / "vit.pth"
    torch.save({"state_dict": _timm_state(vit)}, paths["vit"])
    want = {
        "llm": _snapshot(qwen),
        "whisper": _snapshot(whisper.get_encoder()),
        "beats": _snapshot(beats),
        "vision_tower": _snapshot(vit),
    }
    return paths, want


def test_load_components_loads_given_parts_and_keeps_the_rest(tiny: OlaConfig, tmp_path: Path) -> None:
    paths, want = _write_all(tiny, tmp_path)
    ola = build_model(tiny, seed=1)
    parts = ola.part_modules()
    initial = {name: _snapshot(m) for name, m in parts.items()}

    reports = load_components(ola, llm=paths["llm"], whisper=paths["whisper"])
    assert set(reports) == {"llm", "whisper"}
    assert reports["llm"].loaded == len(want["llm"]) and reports["whisper"].loaded == len(want["whisper"])
    assert _equal_state(parts["llm"], want["llm"]) and _equal_state(parts["whisper"], want["whisper"])
    for name in ("vision_tower", "mm_projector", "beats", "speech_projector"):
        assert _equal_state(parts[name], initial[name]), name

    reports = load_components(ola, beats=paths["beats"], vit=paths["vit"])
    assert set(reports) == {"beats", "vision_tower"}
    assert all(r.loaded == len(want[name]) for name, r in reports.items())
    for name in ("llm", "whisper", "beats", "vision_tower"):
        assert _equal_state(parts[name], want[name]), name
    for name in ("mm_projector", "speech_projector"):  # trained from scratch in stage 1: never loaded here
        assert _equal_state(parts[name], initial[name]), name

    assert load_components(ola) == {}


# ----------------------------------------------------------------------------------------------- corrupt files
LOADERS = {"whisper": load_whisper, "beats": load_beats, "vit": load_vit}


@pytest.mark.parametrize("loader", LOADERS.values(), ids=LOADERS.keys())
def test_random_bytes_pt_names_the_path(tiny: OlaConfig, tmp_path: Path, loader: Loader) -> None:
    path = tmp_path / "corrupt.pt"
    path.write_bytes(os.urandom(4096))
    ola = build_model(tiny, seed=1)
    before = _snapshot(ola)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        loader(ola, path)
    assert _equal_state(ola, before)


@pytest.mark.parametrize("loader", [*LOADERS.values(), load_qwen], ids=[*LOADERS.keys(), "qwen"])
def test_missing_file_names_the_path(tiny: OlaConfig, tmp_path: Path, loader: Loader) -> None:
    path = tmp_path / "does-not-exist.pt"
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        loader(build_model(tiny, seed=1), path)


def test_qwen_dir_with_corrupt_safetensors_names_the_path(tiny: OlaConfig, tmp_path: Path) -> None:
    _qwen_ref(tiny).save_pretrained(tmp_path)
    (tmp_path / SINGLE_FILE).write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / SINGLE_FILE))):
        load_qwen(build_model(tiny, seed=1), tmp_path)


def test_qwen_dir_with_corrupt_config_names_the_path(tiny: OlaConfig, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path)) + ".*config.json"):
        load_qwen(build_model(tiny, seed=1), tmp_path)


def test_whisper_dir_with_corrupt_config_names_the_path(tiny: OlaConfig, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path))):
        load_whisper(build_model(tiny, seed=1), tmp_path)


@pytest.mark.parametrize("loader", LOADERS.values(), ids=LOADERS.keys())
def test_pt_that_is_not_a_dict_names_the_path(tiny: OlaConfig, tmp_path: Path, loader: Loader) -> None:
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        loader(build_model(tiny, seed=1), path)
