"""Stages in order: each starts from the previous stage's model, finished stages are skipped; the CLI."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from ola_model.checkpoint.ola_format import load_checkpoint
from workflows.training.cli import register
from workflows.training.config import ConfigError, load_config
from workflows.training.pipeline import run_pipeline, select_stages
from workflows.training.smoke_data import write_smoke_dataset
from workflows.training.stage import StageError

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


pytestmark = pytest.mark.usefixtures("process_group")


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    """A two-stage recipe (vision projector, then speech projector) over the smoke dataset."""
    tmp = tmp_path_factory.mktemp("pipeline")
    raw = {
        "name": "two-stage",
        "model": {"preset": "tiny", "seed": 0},
        "data": {"root": str(tmp / "nowhere")},  # overridden by --data-root / config.data.root below
        "defaults": {"batch_size": 2, "lr": 1e-3, "steps": 2, "save_every": 1, "max_length": 2048},
        "stages": [
            {"name": "v", "trainable": ["mm_projector"], "data": {"caption": 1.0}},
            {"name": "s", "trainable": ["speech_projector"], "data": ["asr"]},
        ],
    }
    path = tmp / "two-stage.yaml"
    path.write_text(yaml.safe_dump(raw))
    write_smoke_dataset(tmp / "data")
    return path


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ola")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_stages_run_in_order_from_the_previous_model_and_are_not_redone(config_path, tmp_path) -> None:
    config = load_config(config_path)
    config.data.root = str(config_path.parent / "data")
    out = tmp_path / "out"
    with pytest.raises(StageError, match="stage s starts from stage v's model, but stage v has not finished"):
        run_pipeline(config, out, stages=["s"], progress=False)
    first = run_pipeline(config, out, progress=False)
    assert [(r.stage, r.skipped, r.finished) for r in first] == [("v", False, True), ("s", False, True)]
    assert first[1].done["started_from"] == str((out / "stages" / "v" / "model").resolve())
    v, s = load_checkpoint(first[0].model_dir), load_checkpoint(first[1].model_dir)
    # stage s trained only the speech projector, on top of stage v's vision projector
    assert torch.equal(v.mm_projector.proj1.weight, s.mm_projector.proj1.weight)
    assert not torch.equal(v.speech_projector.linear1.weight, s.speech_projector.linear1.weight)
    assert torch.equal(v.llm.lm_head.weight, s.llm.lm_head.weight)

    done_before = (out / "stages" / "s" / "DONE.json").read_text()
    again = run_pipeline(config, out, progress=False)
    assert all(r.skipped for r in again)
    assert (out / "stages" / "s" / "DONE.json").read_text() == done_before
    summary = json.loads((out / "pipeline.json").read_text())
    assert summary["stages"]["v"]["skipped"] and (out / "config.yaml").is_file()


def test_cli_pipeline_run(config_path, tmp_path, capsys) -> None:
    common = ["pipeline", "run", "--config", str(config_path), "--out", str(tmp_path / "cli")]
    common += ["--data-root", str(config_path.parent / "data")]
    code = _cli([*common, "--stages", "s"])
    assert code == 2 and "has not finished" in capsys.readouterr().err
    code = _cli([*common, "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "stage v: done" in printed and "stage s: done" in printed
    code = _cli([*common, "--stages", "s"])
    assert code == 0 and "stage s: skipped (done before)" in capsys.readouterr().out
    assert _cli(["pipeline", "run", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_stage_selection_keeps_config_order(config_path) -> None:
    config = load_config(config_path)
    assert select_stages(config, ["s", "v"]) == ["v", "s"]
    assert select_stages(config, None) == ["v", "s"]
    with pytest.raises(ConfigError, match=r"unknown stage\(s\) \['x'\]"):
        select_stages(config, ["x"])
