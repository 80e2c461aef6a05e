"""The Fig. 3 benchmark's two arms get the same step budget from the same recipe (bench/progressive_vs_mixed.py)."""

from pathlib import Path

import pytest

from bench.progressive_vs_mixed import arms
from workflows.training.config import load_config

TINY = Path(__file__).resolve().parents[2] / "workflows" / "configs" / "tiny.yaml"


def test_the_mixed_arm_has_every_task_every_trainable_part_and_the_same_steps():
    config = load_config(TINY)
    progressive, mixed = arms(config, scale=1.0)
    assert [s.name for s in progressive] == ["1a", "1b", "2", "3a", "3b"]
    assert all(s.data_root is None for s in [*progressive, mixed])  # one dataset for both arms
    assert mixed.steps == sum(s.steps for s in progressive)
    assert set(mixed.data) == {t for s in progressive for t in s.data}
    assert set(mixed.trainable) == {p for s in progressive for p in s.trainable}
    for task, weight in mixed.data.items():
        assert weight == max(s.data.get(task, 0.0) for s in progressive)


def test_scaling_keeps_at_least_one_step_per_stage():
    progressive, mixed = arms(load_config(TINY), scale=0.001)
    assert all(s.steps == 1 for s in progressive) and mixed.steps == len(progressive)
    with pytest.raises(ValueError, match="no stages after"):
        arms(load_config(TINY), 1.0, first="3b")
