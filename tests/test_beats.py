"""The BEATs encoder (``ola_model.beats``): checkpoint key layout, forward semantics, and its pieces."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ola_model.beats import Beats, BeatsAttention, PositionalConv, normalize_beats_state_dict, relative_position_bucket
from ola_model.config import BeatsConfig, OlaConfig
from ola_model.errors import CheckpointError, InputError

PREFIX = "model.speech_encoder.beats_model."
FULL_PARAMS = 90_717_055


def _tiny_cfg() -> BeatsConfig:
    return OlaConfig.from_name("tiny").beats


def _tiny_model(seed: int = 0) -> Beats:
    torch.manual_seed(seed)
    model = Beats.from_config(_tiny_cfg()).eval()
    with torch.no_grad():  # non-trivial gates and layer norms, so the checks below see every term
        for name, param in model.named_parameters():
            if "grep" in name or "layer_norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _expected_full_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (512, 1, 16, 16),
        "layer_norm.weight": (512,),
        "layer_norm.bias": (512,),
        "post_extract_proj.weight": (768, 512),
        "post_extract_proj.bias": (768,),
        "encoder.pos_conv.0.weight_g": (1, 1, 128),
        "encoder.pos_conv.0.weight_v": (768, 48, 128),
        "encoder.pos_conv.0.bias": (768,),
        "encoder.layer_norm.weight": (768,),
        "encoder.layer_norm.bias": (768,),
        "encoder.layers.0.self_attn.relative_attention_bias.weight": (320, 12),
        "predictor.weight": (527, 768),
        "predictor.bias": (527,),
    }
    for i in range(12):
        layer = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{layer}self_attn.{proj}.weight"] = (768, 768)
            shapes[f"{layer}self_attn.{proj}.bias"] = (768,)
        shapes[f"{layer}self_attn.grep_linear.weight"] = (8, 64)
        shapes[f"{layer}self_attn.grep_linear.bias"] = (8,)
        shapes[f"{layer}self_attn.grep_a"] = (1, 12, 1, 1)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            shapes[f"{layer}{norm}.weight"] = (768,)
            shapes[f"{layer}{norm}.bias"] = (768,)
        shapes[f"{layer}fc1.weight"] = (3072, 768)
        shapes[f"{layer}fc1.bias"] = (3072,)
        shapes[f"{layer}fc2.weight"] = (768, 3072)
        shapes[f"{layer}fc2.bias"] = (768,)
    return shapes


def test_full_config_keys_shapes_and_parameter_count_on_meta() -> None:
    with torch.device("meta"):
        model = Beats.from_config(BeatsConfig())
    state = model.state_dict()
    assert all(t.device.type == "meta" for t in state.values())
    got = {key: tuple(t.shape) for key, t in state.items()}
    assert got == _expected_full_shapes()
    total = sum(p.numel() for p in model.parameters())
    assert total == FULL_PARAMS
    assert 90_000_000 <= total <= 91_500_000


def test_no_predictor_without_classes() -> None:
    cfg = _tiny_cfg()
    cfg.num_classes = 0
    with torch.device("meta"):
        model = Beats.from_config(cfg)
    assert not any(key.startswith("predictor.") for key in model.state_dict())


def test_tiny_forward_shape_determinism_and_batch_independence() -> None:
    model = _tiny_model()
    gen = torch.Generator().manual_seed(0)
    waveforms = torch.rand(2, 480000, generator=gen) * 2 - 1
    with torch.no_grad():
        out = model.extract_features(waveforms)
        again = model.extract_features(waveforms)
        alone = model.extract_features(waveforms[1:])
    assert out.shape == (2, 1496, _tiny_cfg().encoder_embed_dim)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.equal(out, again)
    torch.testing.assert_close(out[1:], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[0], out[1])


def test_forward_runs_in_float32_from_bf16_input_and_under_autocast() -> None:
    model = _tiny_model()
    fbank = torch.randn(1, 48, 128)
    with torch.no_grad():
        reference = model(fbank.to(torch.bfloat16).float())
        from_bf16 = model(fbank.to(torch.bfloat16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(fbank.to(torch.bfloat16))
    assert from_bf16.dtype == autocast.dtype == torch.float32
    torch.testing.assert_close(from_bf16, reference)
    torch.testing.assert_close(autocast, reference)


def test_bad_fbank_raises_input_error() -> None:
    model = _tiny_model()
    with pytest.raises(InputError, match="128"):
        model(torch.zeros(1, 100, 64))
    with pytest.raises(InputError, match="fewer than one 16-frame patch"):
        model(torch.zeros(1, 15, 128))
    with pytest.raises(InputError, match="waveform_chunks"):
        model.extract_features(torch.zeros(480000))


def test_relative_position_bucket_hand_values() -> None:
    rel = torch.tensor([0, 1, -1, 79, -79, 80, -80, 200, -200, 799, 10_000, -10_000])
    # |rel| < 80 exact; else 80 + floor(log(|rel| / 80) / log(10) * 80), clamped to 159; +160 for rel > 0
    expected = [0, 161, 1, 239, 79, 240, 80, 160 + 111, 111, 319, 319, 159]
    assert relative_position_bucket(rel, num_buckets=320, max_distance=800).tolist() == expected
    assert 80 + int(math.log(200 / 80) / math.log(10) * 80) == 111


def test_weight_norm_matches_definition_and_torch() -> None:
    torch.manual_seed(0)
    conv = PositionalConv(dim=8, kernel_size=4, groups=2)
    conv.reset_parameters()
    with torch.no_grad():
        conv.weight_g.copy_(torch.rand(1, 1, 4) + 0.5)
    g, v = conv.weight_g.detach(), conv.weight_v.detach()
    weight = conv.weight()
    for k in range(4):  # per kernel position: g[k] * v[:, :, k] / ||v[:, :, k]||
        torch.testing.assert_close(weight[:, :, k], g[0, 0, k] * v[:, :, k] / v[:, :, k].norm())
    with torch.no_grad():
        conv.weight_g.mul_(3.0)
    torch.testing.assert_close(conv.weight(), 3.0 * weight)

    # against torch's own weight norm (dim=2) on a Conv1d; then the even-kernel trim and GELU
    reference = nn.Conv1d(8, 8, kernel_size=4, padding=2, groups=2)
    reference = nn.utils.parametrizations.weight_norm(reference, name="weight", dim=2)
    with torch.no_grad():
        reference.parametrizations.weight.original0.copy_(conv.weight_g)
        reference.parametrizations.weight.original1.copy_(conv.weight_v)
        reference.bias.copy_(torch.randn(8))
        conv.bias.copy_(reference.bias)
    x = torch.randn(2, 8, 10)
    expected = F.gelu(reference(x)[:, :, :-1])
    torch.testing.assert_close(conv(x), expected)
    assert conv(x).shape == (2, 8, 10)


def test_normalize_state_dict_folds_shared_relative_bias() -> None:
    model = _tiny_model()
    base = {PREFIX + key: value for key, value in model.state_dict().items()}
    bias_key = PREFIX + "encoder.layers.{}.self_attn.relative_attention_bias.weight"
    per_layer = dict(base)
    per_layer[bias_key.format(1)] = base[bias_key.format(0)].clone()
    before = dict(per_layer)

    folded = normalize_beats_state_dict(per_layer, prefix=PREFIX)
    assert set(folded) == set(base)
    assert per_layer.keys() == before.keys()  # input untouched
    assert normalize_beats_state_dict(base, prefix=PREFIX) == base  # already in our form
    stripped = {key.removeprefix(PREFIX): value for key, value in folded.items()}
    _tiny_model(seed=1).load_state_dict(stripped, strict=True)

    differing = dict(per_layer)
    differing[bias_key.format(1)] = base[bias_key.format(0)] + 1.0
    with pytest.raises(CheckpointError, match=re.escape(bias_key.format(1))):
        normalize_beats_state_dict(differing, prefix=PREFIX)

    no_layer0 = dict(per_layer)
    del no_layer0[bias_key.format(0)]
    with pytest.raises(CheckpointError) as info:
        normalize_beats_state_dict(no_layer0, prefix=PREFIX)
    assert info.value.missing == [bias_key.format(0)]


def _attention_reference(
    attn: BeatsAttention, x: torch.Tensor, position_bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The original formulation, spelled out: pre-scaled q, row-max shift with alpha 32, gate from unscaled q."""
    n, seq, dim = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    alpha = 32.0
    scaling = head_dim**-0.5
    q = attn.q_proj(x) * scaling / alpha
    k, v = attn.k_proj(x), attn.v_proj(x)
    q = q.view(n, seq, heads, head_dim).transpose(1, 2)
    k = k.view(n, seq, heads, head_dim).transpose(1, 2)
    v = v.view(n, seq, heads, head_dim).transpose(1, 2)
    if position_bias is None:
        buckets = torch.empty(seq, seq, dtype=torch.long)
        for i in range(seq):
            for j in range(seq):
                buckets[i, j] = relative_position_bucket(torch.tensor(j - i), attn.num_buckets, attn.max_distance)
        position_bias = attn.relative_attention_bias(buckets).permute(2, 0, 1)
    weights = q @ k.transpose(-1, -2)
    weights = (weights - weights.max(dim=-1, keepdim=True).values) * alpha
    query_layer = q * alpha / scaling
    gate_a, gate_b = torch.sigmoid(attn.grep_linear(query_layer).view(n, heads, seq, 2, 4).sum(-1)).chunk(2, dim=-1)
    gate_a_1 = gate_a * (gate_b * attn.grep_a - 1.0) + 2.0
    weights = weights + gate_a_1 * position_bias
    probs = torch.softmax(weights.float(), dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(n, seq, dim)
    return attn.out_proj(out), position_bias


def test_gate_math_with_zero_grep_linear() -> None:
    torch.manual_seed(0)
    attn = BeatsAttention(8, 2, num_buckets=320, max_distance=800, has_relative_attention_bias=True, gru_rel_pos=True)
    with torch.no_grad():
        attn.grep_linear.weight.zero_()
        attn.grep_linear.bias.zero_()
        attn.grep_a.copy_(torch.tensor([0.5, 3.0]).view(1, 2, 1, 1))
    attn.eval()
    x = torch.randn(1, 4, 8)
    out, bias = attn(x)
    assert bias.shape == (2, 4, 4)
    # sigmoid(0) = 0.5 for both gates: gate_a_1 = 0.5 * (0.5 * grep_a - 1) + 2, one factor per head
    factor = 0.5 * (0.5 * attn.grep_a.detach() - 1.0) + 2.0  # (1, H, 1, 1)
    torch.testing.assert_close(factor.flatten(), torch.tensor([1.625, 2.25]))
    q = attn.q_proj(x).view(1, 4, 2, 4).transpose(1, 2)
    k = attn.k_proj(x).view(1, 4, 2, 4).transpose(1, 2)
    v = attn.v_proj(x).view(1, 4, 2, 4).transpose(1, 2)
    rel = torch.arange(4)[None, :] - torch.arange(4)[:, None]
    ungated = attn.relative_attention_bias(relative_position_bucket(rel, 320, 800)).permute(2, 0, 1)
    torch.testing.assert_close(bias, ungated)
    scores = q @ k.transpose(-1, -2) / math.sqrt(4) + factor * ungated
    manual = attn.out_proj((torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(1, 4, 8))
    torch.testing.assert_close(out, manual)
    # and against the original's formulation, with random gates and a bias passed in from another layer
    with torch.no_grad():
        attn.grep_linear.weight.normal_()
        attn.grep_linear.bias.normal_()
    for passed in (None, torch.randn(2, 4, 4)):
        out, returned = attn(x, passed)
        expected, expected_bias = _attention_reference(attn, x, passed)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(returned, expected_bias)


def _model_reference(model: Beats, fbank: torch.Tensor) -> torch.Tensor:
    """The forward spelled out from the BEATs description, reusing only the leaf modules' parameters."""
    x = model.patch_embedding(fbank.unsqueeze(1))
    n, channels = x.shape[:2]
    x = x.reshape(n, channels, -1).transpose(1, 2)
    x = model.post_extract_proj(model.layer_norm(x))
    enc = model.encoder
    conv = enc.pos_conv[0]
    weight = conv.weight_g * conv.weight_v / conv.weight_v.norm(dim=(0, 1), keepdim=True)
    x_conv = F.conv1d(x.transpose(1, 2), weight, conv.bias, padding=conv.kernel_size // 2, groups=conv.groups)
    x = x + F.gelu(x_conv[:, :, :-1]).transpose(1, 2)
    x = enc.layer_norm(x)
    alpha = (2 * model.encoder_layers) ** 0.25
    bias = None
    for layer in enc.layers:
        residual = x
        x, bias = _attention_reference(layer.self_attn, x, bias)
        x = layer.self_attn_layer_norm(residual * alpha + x)
        residual = x
        x = layer.fc2(F.gelu(layer.fc1(x)))
        x = layer.final_layer_norm(residual * alpha + x)
    return x


def test_forward_matches_spelled_out_reference() -> None:
    model = _tiny_model()
    assert model.encoder.layers[1].self_attn.relative_attention_bias is None  # layer 1 reuses layer 0's bias
    fbank = torch.randn(2, 70, 128)  # 4 time patches x 8 frequency patches; the 6 extra frames are dropped
    with torch.no_grad():
        out = model(fbank)
        expected = _model_reference(model, fbank)
    assert out.shape == (2, 32, 32)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_training_mode_dropout_is_stochastic_eval_is_not() -> None:
    torch.manual_seed(0)
    model = Beats.from_config(_tiny_cfg(), dropout=0.1, attention_dropout=0.1)
    fbank = torch.randn(1, 32, 128)
    model.train()
    assert not torch.equal(model(fbank), model(fbank))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(fbank), model(fbank))
