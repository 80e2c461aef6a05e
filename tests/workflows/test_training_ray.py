"""The stage on Ray Train: two gloo workers, mixed-modality micro-batches, DeepSpeed ZeRO-2 (about 30-45 s)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ola_model.checkpoint.ola_format import load_checkpoint
from workflows.training.checkpoints import StagePaths
from workflows.training.config import config_from_dict
from workflows.training.stage import run_stage

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def test_stage_on_ray_train_with_two_gloo_workers(data_root, tmp_path) -> None:
    stage = {
        "name": "r",
        "trainable": ["mm_projector", "speech_projector", "llm"],
        # one sample per worker and step: a step pairs an image on one rank with audio on the other
        "data": {"caption": 1.0, "asr": 1.0},
        "steps": 3,
        "batch_size": 1,
        "lr": 1e-3,
        "save_every": 2,
        "max_length": 2048,
    }
    config = config_from_dict(
        {"name": "ray", "model": {"preset": "tiny"}, "data": {"root": str(data_root)}, "stages": [stage]}
    )
    result = run_stage(config, "r", tmp_path, workers=2, use_gpu=False, progress=False)
    assert result.finished and not result.skipped
    assert result.done["world_size"] == 2 and result.done["steps"] == 3 and result.done["samples"] == 6
    lines = [json.loads(line) for line in StagePaths(tmp_path, "r").metrics.read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert all(m["samples_per_s_per_worker"] * 2 == pytest.approx(m["samples_per_s"]) for m in lines)
    load_checkpoint(result.model_dir)  # a complete model in the Ola format
