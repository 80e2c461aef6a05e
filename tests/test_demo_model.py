"""The demo model: where it is found, the clear error when it is not, and the config overrides that shape it."""

from pathlib import Path

import pytest

from ola_model.demo import DEMO_ENV, SHIPPED_DEMO, demo_checkpoint_dir, has_demo_model


def test_the_environment_variable_points_at_another_checkpoint(tmp_path, monkeypatch, tiny_model, tiny_tok):
    from ola_model import load_checkpoint, save_checkpoint

    save_checkpoint(tiny_model, tmp_path / "m", tokenizer=tiny_tok)
    monkeypatch.setenv(DEMO_ENV, str(tmp_path / "m"))
    assert demo_checkpoint_dir() == tmp_path / "m" and has_demo_model()
    assert load_checkpoint(demo_checkpoint_dir()).config == tiny_model.config


def test_a_missing_demo_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(DEMO_ENV, str(tmp_path / "nowhere"))
    assert not has_demo_model()
    with pytest.raises(FileNotFoundError, match=r"ola pipeline run --config workflows/configs/tiny\.yaml"):
        demo_checkpoint_dir()


@pytest.mark.skipif(not (SHIPPED_DEMO / "config.json").is_file(), reason="no demo model shipped in this checkout")
def test_the_shipped_demo_model_is_small_complete_and_documented(monkeypatch):
    from ola_model.checkpoint.ola_format import verify_checkpoint

    monkeypatch.delenv(DEMO_ENV, raising=False)
    path = demo_checkpoint_dir()
    assert path == SHIPPED_DEMO
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    assert size <= 20 * 2**20, f"the demo model is {size / 2**20:.1f} MiB (limit 20)"
    verify_checkpoint(path)
    assert (path / "TRAINING.md").is_file() and (path / "eval.json").is_file()


def test_model_overrides_in_a_training_config_shape_the_first_model(tmp_path):
    from workflows.training.config import ConfigError, config_from_dict

    raw = {
        "name": "t",
        "model": {"preset": "tiny", "overrides": {"llm": {"hidden_size": 96}}},
        "stages": [{"name": "0", "trainable": ["llm"], "data": ["caption"], "steps": 1}],
    }
    assert config_from_dict(raw).model.model_config().llm.hidden_size == 96
    raw["model"]["overrides"] = {"llm": {"width": 96}}
    with pytest.raises(ConfigError, match=r"model\.overrides: unknown llm config keys"):
        config_from_dict(raw)
