import dataclasses
import json
import time

import pytest

from ola_model import OlaConfig, build_model


@pytest.mark.parametrize("name", ["ola-7b", "tiny"])
def test_config_round_trips_through_json(name, tmp_path):
    cfg = OlaConfig.from_name(name)
    again = OlaConfig.from_json(cfg.to_json())
    assert again == cfg
    cfg.save(tmp_path / "c.json")
    assert OlaConfig.load(tmp_path / "c.json") == cfg
    assert json.loads(cfg.to_json())["llm"]["hidden_size"] == cfg.llm.hidden_size


def test_ola_7b_has_the_published_dimensions():
    cfg = OlaConfig.from_name("ola-7b")
    assert (cfg.llm.hidden_size, cfg.llm.intermediate_size, cfg.llm.num_hidden_layers) == (3584, 18944, 28)
    assert (cfg.llm.num_attention_heads, cfg.llm.num_key_value_heads, cfg.llm.vocab_size) == (28, 4, 152064)
    assert cfg.llm.rope_theta == 1e6 and cfg.llm.rms_norm_eps == 1e-6 and not cfg.llm.tie_word_embeddings
    assert (cfg.vision.hidden_size, cfg.vision.num_layers, cfg.vision.mlp_dim, cfg.vision.patch_size) == (
        1152,
        27,
        4304,
        16,
    )
    assert cfg.vision.pos_grid == 128
    assert (cfg.whisper.d_model, cfg.whisper.encoder_layers, cfg.whisper.num_mel_bins) == (1280, 32, 128)
    assert (cfg.beats.encoder_embed_dim, cfg.beats.encoder_layers, cfg.beats.num_buckets) == (768, 12, 320)
    assert cfg.speech_encoder_hidden_size == 2048
    assert cfg.projector.speech_ds_rate == 10
    assert cfg.limits.max_context == 16384 and cfg.limits.max_audio_chunks == 25 and cfg.limits.max_video_frames == 64
    assert cfg.tokenizer_vocab_size == 151670


def test_tiny_has_the_same_structure_at_toy_size():
    big, tiny = OlaConfig.from_name("ola-7b"), OlaConfig.from_name("tiny")
    for sub in ("vision", "whisper", "beats", "projector", "llm", "limits"):
        assert type(getattr(big, sub)) is type(getattr(tiny, sub))
    assert tiny.limits == big.limits  # same token layouts and limits
    assert tiny.vision.patch_size == big.vision.patch_size
    assert tiny.whisper.max_source_positions == big.whisper.max_source_positions


def test_unknown_keys_and_presets_are_rejected():
    data = OlaConfig.from_name("tiny").to_dict()
    data["llm"]["hiden_size"] = 3
    with pytest.raises(ValueError, match="hiden_size"):
        OlaConfig.from_dict(data)
    with pytest.raises(KeyError, match="ola-70b"):
        OlaConfig.from_name("ola-70b")
    with pytest.raises(ValueError, match="divisible"):
        dataclasses.replace(OlaConfig.from_name("tiny").vision, hidden_size=33)


def test_ola_7b_builds_on_meta_in_seconds():
    start = time.perf_counter()
    model = build_model(OlaConfig.from_name("ola-7b"), device="meta")
    assert time.perf_counter() - start < 10
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.part_num_params() == {
        "llm": 7_615_616_512,
        "vision_tower": 431_226_864,
        "mm_projector": 55_537_664,
        "whisper": 636_968_960,
        "beats": 90_717_055,
        "speech_projector": 49_299_456,
    }


def test_build_model_keeps_beats_in_float32():
    import torch

    model = build_model(OlaConfig.from_name("tiny"), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.speech_encoder.beats_model.parameters())
    assert model.vision_tower.pos_embed.dtype == torch.bfloat16


def test_with_overrides_replaces_named_fields_and_names_unknown_keys():
    base = OlaConfig.from_name("tiny")
    wide = base.with_overrides({"name": "tiny-wide", "llm": {"hidden_size": 128, "num_hidden_layers": 4}})
    assert (wide.name, wide.llm.hidden_size, wide.llm.num_hidden_layers) == ("tiny-wide", 128, 4)
    assert wide.llm.vocab_size == base.llm.vocab_size and wide.vision == base.vision
    assert base.llm.hidden_size == 64  # the preset itself is untouched
    with pytest.raises(ValueError, match="unknown llm config keys: \\['hidden'\\]"):
        base.with_overrides({"llm": {"hidden": 1}})
    with pytest.raises(ValueError, match="unknown OlaConfig keys"):
        base.with_overrides({"nonsense": 1})
    with pytest.raises(ValueError, match="must be a mapping"):
        base.with_overrides({"llm": 3})
