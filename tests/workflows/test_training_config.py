"""The training YAML schema: every shipped config loads; bad keys, parts and values are clear errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from ola_model.model import PARTS
from workflows.training.config import ConfigError, config_from_dict, load_config, shipped_configs

CONFIGS = Path(__file__).resolve().parents[2] / "workflows" / "configs"
PAPER_STAGES = ["1a", "1b", "2", "3a", "3b"]
PAPER_TRAINABLE = {
    "1a": {"mm_projector"},
    "1b": {"vision_tower", "mm_projector", "llm"},
    "2": {"mm_projector", "llm"},
    "3a": {"speech_projector"},
    "3b": {"mm_projector", "speech_projector", "llm"},
}

BASE = {
    "name": "t",
    "model": {"preset": "tiny"},
    "data": {"root": "data"},
    "defaults": {"lr": 1e-4, "steps": 10},
    "stages": [{"name": "a", "trainable": ["mm_projector"], "data": {"caption": 1.0}}],
}


def _with(**changes) -> dict:
    raw = copy.deepcopy(BASE)
    for path, value in changes.items():
        node = raw
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[keys[-1]] = value
    return raw


def test_every_shipped_config_loads() -> None:
    paths = shipped_configs()
    assert {p.name for p in paths} >= {"tiny.yaml", "ola-7b.yaml"}
    for path in paths:
        config = load_config(path)
        for stage in config.stages:
            assert set(stage.trainable) <= set(PARTS)
            assert stage.data and all(w > 0 for w in stage.data.values())


def test_stages_follow_the_paper() -> None:
    tiny = load_config(CONFIGS / "tiny.yaml")
    big = load_config(CONFIGS / "ola-7b.yaml")
    assert [s.name for s in tiny.stages] == ["0v", "0a", *PAPER_STAGES]
    warm_up = set(tiny.stage("0v").trainable) | set(tiny.stage("0a").trainable)
    assert warm_up == set(PARTS) - {"beats"}  # BEATs stays random (cost on CPU)
    assert [s.name for s in big.stages] == PAPER_STAGES
    for config in (tiny, big):
        for name, parts in PAPER_TRAINABLE.items():
            assert set(config.stage(name).trainable) == parts, (config.name, name)
        assert set(config.stage("3b").data) >= {"asr", "video_audio_qa", "spoken_image_qa", "image_qa", "video_qa"}
        assert "image_qa" in config.stage("2").data  # image replay
    assert tiny.model.preset == "tiny" and all(s.steps for s in tiny.stages)


def test_ola_7b_carries_the_released_hyperparameters() -> None:
    config = load_config(CONFIGS / "ola-7b.yaml")
    assert config.model.preset == "ola-7b"
    assert {"llm", "whisper", "beats", "vit"} <= {k for k, v in vars(config.model.init).items() if v}
    assert config.resources.workers == 64 and config.resources.use_gpu
    for name in ("1b", "2", "3b"):
        s = config.stage(name)
        assert (s.lr, s.schedule, s.warmup_ratio, s.weight_decay) == (1e-5, "cosine", 0.05, 0.0)
        assert (s.batch_size, s.grad_accum, s.epochs, s.steps) == (2, 1, 1.0, None)
        assert (s.zero_stage, s.precision, s.max_length, s.save_every) == (2, "bf16", 16384, 1000)
        assert s.gradient_checkpointing


def test_defaults_fill_stages_and_lists_are_weight_one() -> None:
    raw = _with(stages=[{"name": 1, "trainable": "llm", "data": ["caption", "asr"], "epochs": 2}])
    config = config_from_dict(raw)
    stage = config.stages[0]
    assert stage.name == "1" and stage.trainable == ("llm",)
    assert stage.data == {"caption": 1.0, "asr": 1.0}
    assert (stage.epochs, stage.steps, stage.lr) == (2.0, None, 1e-4)  # epochs in the stage replaces default steps
    assert "part_lr" not in stage.to_dict()  # unset: as before the key existed (resume fingerprints stay equal)
    with_rate = config_from_dict(_with(stages__0__part_lr={"mm_projector": 1e-3})).stages[0]
    assert with_rate.to_dict()["part_lr"] == {"mm_projector": 1e-3}
    assert config.data_root(stage) == Path("data")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_with(stages__0__trainable=["mm_projector", "eyes"]), r"unknown part\(s\) \['eyes'\].*known parts"),
        (_with(stages__0__lerning_rate=1.0), r"stages\[0\]: unknown key\(s\) \['lerning_rate'\]"),
        (_with(defaults__warmup=0.1), r"defaults: unknown key\(s\) \['warmup'\]"),
        (_with(optimizer={}), r"config: unknown key\(s\) \['optimizer'\]"),
        (_with(stages__0__epochs=1, stages__0__steps=5), "exactly one of steps and epochs"),
        (_with(stages__0__precision="fp8"), "precision must be one of"),
        (_with(stages__0__zero_stage=4), "zero_stage must be one of"),
        (_with(stages__0__lr="fast"), r"stages\[0\] \(a\)\.lr: expected a number"),
        (_with(stages__0__data={"caption": -1}), "weight of 'caption' must be a positive number"),
        (_with(stages__0__trainable=[]), "trainable is empty"),
        (_with(model__preset="ola-70b"), "unknown preset 'ola-70b'"),
        (_with(model__init={"clip": "x"}), r"model.init: unknown key\(s\) \['clip'\]"),
        (_with(stages=[BASE["stages"][0], BASE["stages"][0]]), "stage names must be unique"),
        (_with(stages__0__precision="bf16", stages__0__trainable=["beats"]), "BEATs runs in float32"),
        (_with(stages__0__part_lr={"whisper": 1e-3}), r"part_lr names 'whisper', which this stage does not train"),
        (_with(stages__0__part_lr={"mm_projector": 0}), r"part_lr of 'mm_projector' must be a positive number"),
        (_with(stages__0__part_lr=[1e-3]), "part_lr must map part names to learning rates"),
    ],
)
def test_invalid_configs_are_clear_errors(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_load_config_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_with(stages__0__trainable=["nope"])))
    with pytest.raises(ConfigError, match=r"bad\.yaml: .*unknown part"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="no stage 'z'"):
        config_from_dict(BASE).stage("z")
