"""Parity at toy size: reference implementations, weights copied through the real converters, equal outputs.

litgpt-style: build the reference (transformers' ``Qwen2ForCausalLM`` / ``WhisperForConditionalGeneration``, and an
independent minimal openai-whisper ``AudioEncoder`` written here from its published architecture), save it in the
layout its family publishes, load it with :mod:`ola_model.checkpoint.components` into a differently seeded
:class:`~ola_model.model.OlaModel`, and compare outputs. Plus the name maps at full (ola-7b) size on the meta device.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2ForCausalLM, WhisperForConditionalGeneration
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from ola_model.audio_encoder import whisper_hf_config
from ola_model.checkpoint.components import INDEX_FILE, SINGLE_FILE, load_qwen, load_whisper
from ola_model.checkpoint.name_map import ola_checkpoint_name, whisper_hf_to_openai
from ola_model.checkpoint.strict import named_tensors
from ola_model.config import OlaConfig
from ola_model.errors import CheckpointError
from ola_model.model import OlaModel, build_model, qwen2_config

B, L = 2, 17
N_MELS, N_FRAMES, N_CTX = 128, 3000, 1500


@pytest.fixture(scope="module")
def tiny() -> OlaConfig:
    return OlaConfig.from_name("tiny")


def _perturb_(module: nn.Module, seed: int, scale: float = 0.1) -> None:
    """Add seeded noise to every floating tensor of the state dict (norm weights, biases, position tables too), so
    a converter that dropped or swapped any of them would change the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict(keep_vars=True).values():
            if t.is_floating_point():
                t.add_(scale * torch.randn(t.shape, generator=gen, dtype=t.dtype))


def _params_differ(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return any(not torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------------- Qwen2
@pytest.fixture(scope="module")
def qwen_ref(tiny: OlaConfig) -> Qwen2ForCausalLM:
    torch.manual_seed(123)
    ref = Qwen2ForCausalLM(qwen2_config(tiny.llm)).eval()
    _perturb_(ref, seed=124, scale=0.02)
    return ref


@pytest.fixture(scope="module")
def qwen_dir(qwen_ref: Qwen2ForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qwen")
    qwen_ref.save_pretrained(path)  # transformers 5 always writes safetensors
    assert (path / SINGLE_FILE).is_file() and not (path / INDEX_FILE).exists()
    return path


def _ids_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 1000, (B, L), generator=gen)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :5] = 0  # left padding in the second row
    return ids, mask


def _assert_same_logits(ola: OlaModel, ref: Qwen2ForCausalLM) -> None:
    ids, mask = _ids_and_mask()
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = ola.llm(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)

        # with a padding mask: compare the positions that are real tokens
        want_m = ref(input_ids=ids, attention_mask=mask).logits
        got_m = ola.llm(input_ids=ids, attention_mask=mask).logits
        real = mask.bool()
        torch.testing.assert_close(got_m[real], want_m[real], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(want_m[1, 5:], want[1, 5:], atol=1e-4)  # the mask did change the real rows

        # OlaModel.forward over embeddings, as the multimodal path drives it
        emb = ola.embed_tokens(ids)  # (B, L, C)
        assert emb.shape == (B, L, ola.config.llm.hidden_size)
        torch.testing.assert_close(ola(emb).logits, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ola(emb, attention_mask=mask).logits[real], want_m[real], rtol=1e-6, atol=1e-6)


def test_qwen2_parity_single_file(tiny: OlaConfig, qwen_ref: Qwen2ForCausalLM, qwen_dir: Path) -> None:
    ola = build_model(tiny, seed=1)
    assert _params_differ(ola.llm, qwen_ref)  # the test starts from different weights
    report = load_qwen(ola, qwen_dir)
    assert report.loaded == len(qwen_ref.state_dict()) == len(named_tensors(ola.llm))
    assert report.skipped == {}
    _assert_same_logits(ola, qwen_ref)


def test_qwen2_parity_sharded(tiny: OlaConfig, qwen_ref: Qwen2ForCausalLM, qwen_dir: Path, tmp_path: Path) -> None:
    qwen_ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / INDEX_FILE).is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1

    sharded, single = build_model(tiny, seed=2), build_model(tiny, seed=3)
    assert load_qwen(sharded, tmp_path).loaded == load_qwen(single, qwen_dir).loaded
    s1, s2 = sharded.llm.state_dict(), single.llm.state_dict()
    assert s1.keys() == s2.keys()
    for key in s1:
        assert torch.equal(s1[key], s2[key]), key
    _assert_same_logits(sharded, qwen_ref)


# --------------------------------------------------------------------------------------------- Whisper (HF dir)
def _random_mel(seed: int = 11) -> torch.Tensor:
    """(2, n_mels, 3000): the channels-first layout both encoders take."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, N_MELS, N_FRAMES, generator=gen)


def test_whisper_hf_dir_parity(tiny: OlaConfig, tmp_path: Path) -> None:
    torch.manual_seed(21)
    ref = WhisperForConditionalGeneration(whisper_hf_config(tiny.whisper)).eval()
    _perturb_(ref.get_encoder(), seed=22)
    ref.save_pretrained(tmp_path)

    ola = build_model(tiny, seed=1)
    report = load_whisper(ola, tmp_path)
    assert report.loaded == len(named_tensors(ola.speech_encoder.whisper_model))
    decoder_keys = [k for k in report.skipped if k.startswith("model.decoder.")]
    assert decoder_keys, "the decoder keys should be reported as skipped"
    assert all("decoder" in report.skipped[k] for k in decoder_keys)
    assert all(k.startswith("model.decoder.") or k == "proj_out.weight" for k in report.skipped)

    mel = _random_mel()
    with torch.no_grad():
        want = ref.get_encoder()(mel).last_hidden_state
        got = ola.speech_encoder.whisper_model(mel).last_hidden_state
    assert got.shape == (2, N_CTX, tiny.whisper.d_model)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- Whisper (openai-whisper .pt)
def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """openai-whisper's positional table: (length, channels), sin half then cos half."""
    assert channels % 2 == 0
    log_timescale_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2))
    scaled_time = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


class MultiHeadAttention(nn.Module):
    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        scale = D**-0.25  # applied to q and to k, as openai-whisper does
        q = self.query(x).view(B, T, H, D).permute(0, 2, 1, 3) * scale  # (B, H, T, D)
        k = self.key(x).view(B, T, H, D).permute(0, 2, 3, 1) * scale  # (B, H, D, T)
        v = self.value(x).view(B, T, H, D).permute(0, 2, 1, 3)  # (B, H, T, D)
        w = F.softmax((q @ k).float(), dim=-1).to(q.dtype)  # (B, H, T, T)
        return self.out((w @ v).permute(0, 2, 1, 3).flatten(2))  # (B, T, C)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(d, n_head)
        self.attn_ln = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.mlp_ln = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    """Minimal openai-whisper ``AudioEncoder``: mel (B, n_mels, 2 n_ctx) -> (B, n_ctx, d)."""

    def __init__(self, n_mels: int, n_ctx: int, d: int, n_head: int, n_layer: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(n_ctx, d))
        self.blocks = nn.ModuleList([ResidualAttentionBlock(d, n_head) for _ in range(n_layer)])
        self.ln_post = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(x))  # (B, d, 3000)
        x = F.gelu(self.conv2(x))  # (B, d, 1500)
        x = x.permute(0, 2, 1)  # (B, 1500, d)
        assert x.shape[1:] == self.positional_embedding.shape, "incorrect audio shape"
        x = x + self.positional_embedding
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


@pytest.fixture(scope="module")
def tiny_openai(tiny: OlaConfig) -> OlaConfig:
    """The tiny preset, whose Whisper is openai-shaped: openai-whisper's MLP width is always 4 d."""
    assert tiny.whisper.encoder_ffn_dim == 4 * tiny.whisper.d_model
    return tiny


def _openai_dims(cfg: OlaConfig) -> dict[str, int]:
    w = cfg.whisper
    return {
        "n_mels": w.num_mel_bins,
        "n_audio_ctx": w.max_source_positions,
        "n_audio_state": w.d_model,
        "n_audio_head": w.encoder_attention_heads,
        "n_audio_layer": w.encoder_layers,
        "n_vocab": 51866,
        "n_text_ctx": 448,
        "n_text_state": w.d_model,
        "n_text_head": w.encoder_attention_heads,
        "n_text_layer": 1,
    }


def _fake_decoder(d: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(33)
    shapes = {
        "decoder.token_embedding.weight": (51866, d),
        "decoder.positional_embedding": (448, d),
        "decoder.blocks.0.attn.query.weight": (d, d),
        "decoder.blocks.0.cross_attn.key.weight": (d, d),
        "decoder.ln.weight": (d,),
    }
    return {k: torch.randn(shape, generator=gen) for k, shape in shapes.items()}


def _openai_encoder(cfg: OlaConfig, seed: int = 31) -> AudioEncoder:
    w = cfg.whisper
    torch.manual_seed(seed)
    enc = AudioEncoder(w.num_mel_bins, w.max_source_positions, w.d_model, w.encoder_attention_heads, w.encoder_layers)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # layer norms and the position table away from their defaults, so the map is tested
        for name, t in enc.state_dict(keep_vars=True).items():
            if "ln" in name or name == "positional_embedding":
                t.add_(0.1 * torch.randn(t.shape, generator=gen))
    return enc.eval()


@pytest.fixture(scope="module")
def openai_encoder(tiny_openai: OlaConfig) -> AudioEncoder:
    return _openai_encoder(tiny_openai)


def _save_openai(path: Path, dims: dict[str, int], encoder_state: dict[str, torch.Tensor]) -> Path:
    state = {"encoder." + k: v for k, v in encoder_state.items()} | _fake_decoder(dims["n_audio_state"])
    torch.save({"dims": dims, "model_state_dict": state}, path)
    return path


def test_whisper_openai_pt_parity(tiny_openai: OlaConfig, openai_encoder: AudioEncoder, tmp_path: Path) -> None:
    d = tiny_openai.whisper.d_model
    path = _save_openai(tmp_path / "tiny.pt", _openai_dims(tiny_openai), openai_encoder.state_dict())

    ola = build_model(tiny_openai, seed=1)
    report = load_whisper(ola, path)
    assert report.loaded == len(openai_encoder.state_dict()) == len(named_tensors(ola.speech_encoder.whisper_model))
    assert set(report.skipped) == set(_fake_decoder(d))
    assert all("decoder" in reason for reason in report.skipped.values())

    mel = _random_mel()
    with torch.no_grad():
        want = openai_encoder(mel)
        got = ola.speech_encoder.whisper_model(mel).last_hidden_state
    assert want.shape == got.shape == (2, N_CTX, d)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_tiny_preset_loads_an_openai_shaped_whisper_pt(tiny: OlaConfig, tmp_path: Path) -> None:
    path = _save_openai(tmp_path / "tiny.pt", _openai_dims(tiny), _openai_encoder(tiny).state_dict())
    report = load_whisper(build_model(tiny, seed=1), path)
    assert report.loaded == len(_openai_encoder(tiny).state_dict())


@pytest.mark.parametrize("field", ["n_audio_state", "n_audio_layer", "n_audio_head", "n_mels"])
def test_whisper_openai_pt_wrong_dims(
    tiny_openai: OlaConfig, openai_encoder: AudioEncoder, tmp_path: Path, field: str
) -> None:
    dims = _openai_dims(tiny_openai)
    dims[field] += 1
    path = _save_openai(tmp_path / "wrong.pt", dims, openai_encoder.state_dict())
    ola = build_model(tiny_openai, seed=1)
    before = ola.speech_encoder.whisper_model.conv1.weight.clone()
    with pytest.raises(CheckpointError, match=rf"{field}={dims[field]} \(model needs {dims[field] - 1}\)"):
        load_whisper(ola, path)
    assert torch.equal(ola.speech_encoder.whisper_model.conv1.weight, before)  # nothing was read


def test_whisper_openai_pt_missing_key(tiny_openai: OlaConfig, openai_encoder: AudioEncoder, tmp_path: Path) -> None:
    state = dict(openai_encoder.state_dict())
    del state["blocks.1.attn.key.weight"]
    path = _save_openai(tmp_path / "missing.pt", _openai_dims(tiny_openai), state)
    with pytest.raises(CheckpointError, match=r"encoder\.blocks\.1\.attn\.key\.weight") as exc:
        load_whisper(build_model(tiny_openai, seed=1), path)
    assert exc.value.missing == ["encoder.blocks.1.attn.key.weight"]
    assert exc.value.unexpected == [] and exc.value.mismatched == []


# ------------------------------------------------------------------------------------------ name maps at 7B
def _published_shapes() -> dict[str, tuple[int, ...]]:
    """The published Ola-7b keys and shapes, written out from the reference tables (ola-architecture.md §1.3)."""
    V, C, kv, ffn = 152064, 3584, 512, 18944
    s: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (V, C),
        "model.norm.weight": (C,),
        "lm_head.weight": (V, C),
    }
    for i in range(28):
        p = f"model.layers.{i}."
        s |= {
            p + "self_attn.q_proj.weight": (C, C),
            p + "self_attn.q_proj.bias": (C,),
            p + "self_attn.k_proj.weight": (kv, C),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, C),
            p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (C, C),
            p + "mlp.gate_proj.weight": (ffn, C),
            p + "mlp.up_proj.weight": (ffn, C),
            p + "mlp.down_proj.weight": (C, ffn),
            p + "input_layernorm.weight": (C,),
            p + "post_attention_layernorm.weight": (C,),
        }
    vt, D, M = "model.vision_tower.vision_tower.", 1152, 4304
    s |= {
        vt + "pos_embed": (1, 16384, D),
        vt + "patch_embed.proj.weight": (D, 3, 16, 16),
        vt + "patch_embed.proj.bias": (D,),
    }
    for i in range(27):
        p = f"{vt}blocks.{i}."
        for norm in ("norm1", "norm2"):
            s |= {p + norm + ".weight": (D,), p + norm + ".bias": (D,)}
        s |= {p + "attn.qkv.weight": (3 * D, D), p + "attn.qkv.bias": (3 * D,)}
        s |= {p + "attn.proj.weight": (D, D), p + "attn.proj.bias": (D,)}
        s |= {
            p + "mlp.fc1.weight": (M, D),
            p + "mlp.fc1.bias": (M,),
            p + "mlp.fc2.weight": (D, M),
            p + "mlp.fc2.bias": (D,),
        }
    mp = "model.mm_projector."
    s |= {mp + "proj1.weight": (C, D), mp + "proj1.bias": (C,), mp + "proj2.weight": (C, C), mp + "proj2.bias": (C,)}
    s |= {mp + "pooler.predictor.0.weight": (C, 2 * C), mp + "pooler.predictor.0.bias": (C,)}
    s |= {mp + "pooler.predictor.2.weight": (C, C), mp + "pooler.predictor.2.bias": (C,)}
    s |= {mp + name: (C,) for name in ("image_newline", "image_begin", "image_end", "image_sep")}
    sp = "model.speech_projector."
    s |= {sp + "linear1.weight": (2048, 20480), sp + "linear1.bias": (2048,)}
    s |= {sp + "linear2.weight": (C, 2048), sp + "linear2.bias": (C,)}
    s |= {sp + name: (C,) for name in ("speech_newline", "speech_begin", "speech_end")}
    wp, W = "model.speech_encoder.whisper_model.", 1280
    s |= {
        wp + "conv1.weight": (W, 128, 3),
        wp + "conv1.bias": (W,),
        wp + "conv2.weight": (W, W, 3),
        wp + "conv2.bias": (W,),
    }
    s |= {wp + "positional_embedding": (1500, W), wp + "ln_post.weight": (W,), wp + "ln_post.bias": (W,)}
    for i in range(32):
        p = f"{wp}blocks.{i}."
        s |= {p + f"attn.{n}.weight": (W, W) for n in ("query", "key", "value", "out")}
        s |= {p + f"attn.{n}.bias": (W,) for n in ("query", "value", "out")}  # key has no bias
        s |= {
            p + "mlp.0.weight": (4 * W, W),
            p + "mlp.0.bias": (4 * W,),
            p + "mlp.2.weight": (W, 4 * W),
            p + "mlp.2.bias": (W,),
        }
        for ln in ("attn_ln", "mlp_ln"):
            s |= {p + ln + ".weight": (W,), p + ln + ".bias": (W,)}
    bp, E = "model.speech_encoder.beats_model.", 768
    s |= {
        bp + "patch_embedding.weight": (512, 1, 16, 16),
        bp + "layer_norm.weight": (512,),
        bp + "layer_norm.bias": (512,),
    }
    s |= {bp + "post_extract_proj.weight": (E, 512), bp + "post_extract_proj.bias": (E,)}
    s |= {bp + "encoder.pos_conv.0.weight_g": (1, 1, 128), bp + "encoder.pos_conv.0.weight_v": (E, 48, 128)}
    s |= {
        bp + "encoder.pos_conv.0.bias": (E,),
        bp + "encoder.layer_norm.weight": (E,),
        bp + "encoder.layer_norm.bias": (E,),
    }
    s |= {bp + "encoder.layers.0.self_attn.relative_attention_bias.weight": (320, 12)}
    s |= {bp + "predictor.weight": (527, E), bp + "predictor.bias": (527,)}
    for i in range(12):
        p = f"{bp}encoder.layers.{i}."
        s |= {p + f"self_attn.{n}_proj.weight": (E, E) for n in ("q", "k", "v", "out")}
        s |= {p + f"self_attn.{n}_proj.bias": (E,) for n in ("q", "k", "v", "out")}
        s |= {p + "self_attn.grep_linear.weight": (8, 64), p + "self_attn.grep_linear.bias": (8,)}
        s |= {p + "self_attn.grep_a": (1, 12, 1, 1)}
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            s |= {p + ln + ".weight": (E,), p + ln + ".bias": (E,)}
        s |= {p + "fc1.weight": (3072, E), p + "fc1.bias": (3072,), p + "fc2.weight": (E, 3072), p + "fc2.bias": (E,)}
    return s


def test_ola_name_map_is_a_bijection_onto_the_published_keys() -> None:
    model = build_model(OlaConfig.from_name("ola-7b"), device="meta")
    tensors = named_tensors(model)
    mapped = {ola_checkpoint_name(name): tuple(t.shape) for name, t in tensors.items()}
    assert len(mapped) == len(tensors), "two internal tensors map to one published key"
    want = _published_shapes()
    assert sorted(set(want) - set(mapped)) == []
    assert sorted(set(mapped) - set(want)) == []
    wrong = {k: (mapped[k], want[k]) for k in want if mapped[k] != want[k]}
    assert wrong == {}


def test_whisper_map_covers_every_encoder_key() -> None:
    w = OlaConfig.from_name("ola-7b").whisper
    with torch.device("meta"):
        hf = WhisperEncoder(whisper_hf_config(w))
        openai = AudioEncoder(
            w.num_mel_bins, w.max_source_positions, w.d_model, w.encoder_attention_heads, w.encoder_layers
        )
    hf_state, openai_state = hf.state_dict(), openai.state_dict()
    mapped = {whisper_hf_to_openai(k): tuple(v.shape) for k, v in hf_state.items()}
    assert len(mapped) == len(hf_state), "two WhisperEncoder keys map to one openai key"
    assert mapped == {k: tuple(v.shape) for k, v in openai_state.items()}
    with pytest.raises(KeyError, match=r"layers\.0\.self_attn\.rotary\.weight"):
        whisper_hf_to_openai("layers.0.self_attn.rotary.weight")
