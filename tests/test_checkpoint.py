"""Strict loading and saving of the Ola checkpoint layout."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from ola_model import CheckpointError, OlaConfig, build_model, expected_checkpoint_shapes, load_checkpoint
from ola_model import save_checkpoint as save
from ola_model.checkpoint.ola_format import config_from_json, verify_checkpoint
from ola_model.checkpoint.safetensors_io import DTYPE_NAMES, SafetensorsFile, write_safetensors


# --------------------------------------------------------------------------------------- the published key set
def published_ola_7b_layout() -> dict[str, tuple[int, ...]]:
    """The Ola-7b checkpoint keys and shapes, written out from the reference tables (ola-architecture.md §1.3)."""
    s: dict[str, tuple[int, ...]] = {}
    d, ff, kv, V = 3584, 18944, 512, 152064
    s["model.embed_tokens.weight"] = (V, d)
    for i in range(28):
        p = f"model.layers.{i}."
        s |= {p + "self_attn.q_proj.weight": (d, d), p + "self_attn.q_proj.bias": (d,)}
        s |= {p + "self_attn.k_proj.weight": (kv, d), p + "self_attn.k_proj.bias": (kv,)}
        s |= {p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.v_proj.bias": (kv,)}
        s |= {p + "self_attn.o_proj.weight": (d, d)}
        s |= {
            p + "mlp.gate_proj.weight": (ff, d),
            p + "mlp.up_proj.weight": (ff, d),
            p + "mlp.down_proj.weight": (d, ff),
        }
        s |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}
    s |= {"model.norm.weight": (d,), "lm_head.weight": (V, d)}
    v = "model.vision_tower.vision_tower."
    s |= {v + "pos_embed": (1, 16384, 1152), v + "patch_embed.proj.weight": (1152, 3, 16, 16)}
    s |= {v + "patch_embed.proj.bias": (1152,)}
    for i in range(27):
        p = f"{v}blocks.{i}."
        for n in ("norm1", "norm2"):
            s |= {p + n + ".weight": (1152,), p + n + ".bias": (1152,)}
        s |= {p + "attn.qkv.weight": (3456, 1152), p + "attn.qkv.bias": (3456,)}
        s |= {p + "attn.proj.weight": (1152, 1152), p + "attn.proj.bias": (1152,)}
        s |= {p + "mlp.fc1.weight": (4304, 1152), p + "mlp.fc1.bias": (4304,)}
        s |= {p + "mlp.fc2.weight": (1152, 4304), p + "mlp.fc2.bias": (1152,)}
    m = "model.mm_projector."
    s |= {m + "proj1.weight": (d, 1152), m + "proj1.bias": (d,), m + "proj2.weight": (d, d), m + "proj2.bias": (d,)}
    s |= {m + "pooler.predictor.0.weight": (d, 2 * d), m + "pooler.predictor.0.bias": (d,)}
    s |= {m + "pooler.predictor.2.weight": (d, d), m + "pooler.predictor.2.bias": (d,)}
    s |= {m + n: (d,) for n in ("image_newline", "image_begin", "image_end", "image_sep")}
    sp = "model.speech_projector."
    s |= {sp + "linear1.weight": (2048, 20480), sp + "linear1.bias": (2048,)}
    s |= {sp + "linear2.weight": (d, 2048), sp + "linear2.bias": (d,)}
    s |= {sp + n: (d,) for n in ("speech_newline", "speech_begin", "speech_end")}
    w = "model.speech_encoder.whisper_model."
    s |= {w + "conv1.weight": (1280, 128, 3), w + "conv1.bias": (1280,), w + "conv2.weight": (1280, 1280, 3)}
    s |= {w + "conv2.bias": (1280,), w + "positional_embedding": (1500, 1280)}
    for i in range(32):
        p = f"{w}blocks.{i}."
        s |= {
            p + "attn.query.weight": (1280, 1280),
            p + "attn.query.bias": (1280,),
            p + "attn.key.weight": (1280, 1280),
        }
        s |= {p + "attn.value.weight": (1280, 1280), p + "attn.value.bias": (1280,)}
        s |= {p + "attn.out.weight": (1280, 1280), p + "attn.out.bias": (1280,)}
        s |= {p + "mlp.0.weight": (5120, 1280), p + "mlp.0.bias": (5120,)}
        s |= {p + "mlp.2.weight": (1280, 5120), p + "mlp.2.bias": (1280,)}
        for n in ("attn_ln", "mlp_ln"):
            s |= {p + n + ".weight": (1280,), p + n + ".bias": (1280,)}
    s |= {w + "ln_post.weight": (1280,), w + "ln_post.bias": (1280,)}
    b = "model.speech_encoder.beats_model."
    s |= {
        b + "patch_embedding.weight": (512, 1, 16, 16),
        b + "layer_norm.weight": (512,),
        b + "layer_norm.bias": (512,),
    }
    s |= {b + "post_extract_proj.weight": (768, 512), b + "post_extract_proj.bias": (768,)}
    s |= {b + "encoder.pos_conv.0.weight_g": (1, 1, 128), b + "encoder.pos_conv.0.weight_v": (768, 48, 128)}
    s |= {b + "encoder.pos_conv.0.bias": (768,), b + "encoder.layer_norm.weight": (768,)}
    s |= {b + "encoder.layer_norm.bias": (768,), b + "predictor.weight": (527, 768), b + "predictor.bias": (527,)}
    for i in range(12):
        p = f"{b}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s |= {p + f"self_attn.{n}.weight": (768, 768), p + f"self_attn.{n}.bias": (768,)}
        s |= {p + "self_attn.grep_linear.weight": (8, 64), p + "self_attn.grep_linear.bias": (8,)}
        s |= {p + "self_attn.grep_a": (1, 12, 1, 1)}
        for n in ("self_attn_layer_norm", "final_layer_norm"):
            s |= {p + n + ".weight": (768,), p + n + ".bias": (768,)}
        s |= {
            p + "fc1.weight": (3072, 768),
            p + "fc1.bias": (3072,),
            p + "fc2.weight": (768, 3072),
            p + "fc2.bias": (768,),
        }
    s[b + "encoder.layers.0.self_attn.relative_attention_bias.weight"] = (320, 12)
    return s


def test_expected_checkpoint_shapes_is_the_published_layout():
    assert expected_checkpoint_shapes(OlaConfig.from_name("ola-7b")) == published_ola_7b_layout()


PUBLISHED_CONFIG = {
    "architectures": ["OmniSpeechVisionQwenForCausalLM"],
    "model_type": "ola_qwen",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
    "mm_vision_tower": "./pretrained/oryx_vit.pth",
    "mm_hidden_size": 1152,
    "mm_projector_type": "ola_mlp",
    "speech_encoder": "./pretrained/large-v3.pt",
    "speech_encoder_type": "dual",
    "speech_encoder_hidden_size": 2048,
    "speech_encoder_ds_rate": 10,
    "speech_projector_type": "linear",
    "tokenizer_model_max_length": 16384,
    "torch_dtype": "bfloat16",
    "vocab_size": 152064,
}


def test_published_config_json_gives_the_ola_7b_config():
    cfg = config_from_json(PUBLISHED_CONFIG)
    assert cfg.llm == OlaConfig.from_name("ola-7b").llm
    assert cfg.vision == OlaConfig.from_name("ola-7b").vision and cfg.name == "ola-7b"
    assert cfg.tokenizer_vocab_size == 151670  # the checkpoint has 152064 rows; the tokenizer 151670 tokens
    with pytest.raises(CheckpointError, match="mm_hidden_size"):
        config_from_json(PUBLISHED_CONFIG | {"mm_hidden_size": 1024})
    with pytest.raises(CheckpointError, match="model_type"):
        config_from_json(PUBLISHED_CONFIG | {"model_type": "qwen2"})


def _write_header_only_shard(path, entries: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """A safetensors file whose data section is a sparse hole: full published sizes at no disk cost."""
    header, offset = {}, 0
    itemsize = {"BF16": 2, "F32": 4}
    for name, (dtype, shape) in sorted(entries.items()):
        n = itemsize[dtype]
        for dim in shape:
            n *= dim
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)


def test_the_full_published_ola_7b_layout_verifies(tmp_path):
    """Four shards as published: bf16 everywhere but BEATs in fp32, BEATs' shared bias stored in every layer."""
    layout = published_ola_7b_layout()
    beats_bias = "model.speech_encoder.beats_model.encoder.layers.{}.self_attn.relative_attention_bias.weight"
    for i in range(1, 12):
        layout[beats_bias.format(i)] = (320, 12)
    keys = sorted(layout)
    shards = [keys[i::4] for i in range(4)]
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-00004.safetensors"
        entries = {k: ("F32" if ".beats_model." in k else "BF16", layout[k]) for k in shard}
        _write_header_only_shard(tmp_path / name, entries)
        weight_map |= dict.fromkeys(shard, name)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED_CONFIG))

    report = verify_checkpoint(tmp_path)
    assert report.loaded == len(published_ola_7b_layout())
    assert sorted(report.skipped) == sorted(beats_bias.format(i) for i in range(1, 12))
    # 8.88 B parameters: ~17.94 GB with BEATs in fp32, as the published shard sizes add up to
    assert 17.8e9 < report.bytes < 18.0e9


# ---------------------------------------------------------------------------------- tiny checkpoints on disk
@pytest.fixture()
def tiny_ckpt(tmp_path, tiny_model, tiny_tok):
    return save(tiny_model, tmp_path / "ckpt", tokenizer=tiny_tok, max_shard_bytes=300_000)


def test_sharded_tiny_checkpoint_loads_exactly(tiny_ckpt, tiny_model):
    index = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # really sharded
    assert set(index["weight_map"]) == set(expected_checkpoint_shapes(tiny_model.config))
    loaded = load_checkpoint(tiny_ckpt)
    assert loaded.config == tiny_model.config
    for (name, a), (name_b, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert name == name_b
        assert torch.equal(a, b), name
    # same function, not just the same tensors (RoPE buffers are rebuilt after loading)
    ids = torch.arange(12)[None]
    emb = tiny_model.embed_tokens(ids)
    torch.testing.assert_close(loaded(emb).logits, tiny_model(emb).logits)


def test_save_is_lossless_for_mixed_dtypes(tmp_path, tiny_config, tiny_tok):
    model = build_model(tiny_config, dtype=torch.bfloat16, seed=3)
    path = save(model, tmp_path / "bf16", tokenizer=tiny_tok)
    shard = SafetensorsFile(next(path.glob("*.safetensors")))
    dtypes = {k: e.dtype for k, e in shard.entries.items()}
    assert dtypes["model.speech_encoder.beats_model.encoder.pos_conv.0.weight_v"] == torch.float32
    assert dtypes["model.embed_tokens.weight"] == torch.bfloat16
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_checkpoint(path)  # dtype=None: as stored
    for name, t in model.state_dict().items():
        assert loaded.state_dict()[name].dtype == t.dtype and torch.equal(loaded.state_dict()[name], t), name
    as_f32 = load_checkpoint(path, dtype=torch.float32)
    assert as_f32.dtype == torch.float32
    torch.testing.assert_close(as_f32.llm.lm_head.weight, model.llm.lm_head.weight.float())


def _rewrite(ckpt, edit) -> None:
    """Apply ``edit(tensors)`` to the checkpoint's tensors and rewrite it as one shard."""
    tensors = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        shard = SafetensorsFile(f)
        tensors |= {k: shard.read(k) for k in shard.entries}
        f.unlink()
    edit(tensors)
    write_safetensors(ckpt / "model-00001-of-00001.safetensors", tensors)
    index = {"metadata": {}, "weight_map": dict.fromkeys(tensors, "model-00001-of-00001.safetensors")}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))


def test_missing_extra_and_misshaped_keys_are_all_named(tiny_ckpt):
    missing = "model.speech_projector.speech_end"
    mis = "model.mm_projector.proj1.weight"

    def edit(t):
        del t[missing]
        t["model.some_extra_head.weight"] = torch.zeros(3)
        t[mis] = t[mis][:, :-1].contiguous()

    _rewrite(tiny_ckpt, edit)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tiny_ckpt)
    e = err.value
    assert e.missing == [missing] and e.unexpected == ["model.some_extra_head.weight"]
    assert [m[0] for m in e.mismatched] == [mis]
    text = str(e)
    for key in (missing, "model.some_extra_head.weight", mis):
        assert key in text
    with pytest.raises(CheckpointError):
        verify_checkpoint(tiny_ckpt)


def test_beats_bias_stored_in_every_layer_loads_and_must_agree(tiny_ckpt, tiny_model):
    key = "model.speech_encoder.beats_model.encoder.layers.{}.self_attn.relative_attention_bias.weight"
    _rewrite(tiny_ckpt, lambda t: t.update({key.format(1): t[key.format(0)].clone()}))
    loaded = load_checkpoint(tiny_ckpt)
    assert key.format(1) in loaded.load_report.skipped
    _rewrite(tiny_ckpt, lambda t: t.update({key.format(1): t[key.format(0)] + 1}))
    with pytest.raises(CheckpointError, match=r"layers\.1\."):
        load_checkpoint(tiny_ckpt)


def test_truncated_or_missing_shards_fail_clearly(tiny_ckpt):
    shards = sorted(tiny_ckpt.glob("*.safetensors"))
    with open(shards[0], "r+b") as f:
        f.truncate(os.path.getsize(shards[0]) - 100)
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tiny_ckpt)
    shards[1].unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tiny_ckpt)
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_checkpoint(tiny_ckpt.parent / "nowhere")


def test_save_is_atomic_and_never_overwrites_by_accident(tmp_path, tiny_model):
    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save(tiny_model, tmp_path / "ckpt", tokenizer=BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []  # no half-written directory, no temporary left behind
    save(tiny_model, tmp_path / "ckpt")
    with pytest.raises(FileExistsError):
        save(tiny_model, tmp_path / "ckpt")
    save(tiny_model, tmp_path / "ckpt", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_our_safetensors_files_interoperate_with_the_safetensors_library(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {
        "a": torch.randn(3, 5).to(torch.bfloat16),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(2, 2, 2),
        "empty": torch.zeros(0, 4),
    }
    write_safetensors(tmp_path / "ours.safetensors", tensors)
    theirs = load_file(tmp_path / "ours.safetensors")
    for k, v in tensors.items():
        assert torch.equal(theirs[k], v)
    save_file(tensors, tmp_path / "theirs.safetensors")
    f = SafetensorsFile(tmp_path / "theirs.safetensors")
    for k, v in tensors.items():
        assert torch.equal(f.read(k), v) and f.entries[k].dtype == v.dtype
    assert set(DTYPE_NAMES.values()) >= {"BF16", "F32", "I64"}


def test_loading_reads_straight_into_the_parameters(tiny_ckpt, monkeypatch):
    """No intermediate copy when dtypes match: every read lands in the destination tensor's own storage."""
    calls = []
    original = SafetensorsFile.read_into

    def spy(self, name, out):
        calls.append(out.data_ptr())
        return original(self, name, out)

    monkeypatch.setattr(SafetensorsFile, "read_into", spy)
    model = load_checkpoint(tiny_ckpt)
    ptrs = {t.data_ptr() for t in model.state_dict().values()}
    assert calls and set(calls) <= ptrs
