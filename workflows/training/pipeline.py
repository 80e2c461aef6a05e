"""Run the stages of a training config in order (Ola's progressive modality alignment).

Each stage starts from the previous stage's output model (``OUT/stages/<prev>/model``); the first starts from the
config's preset and component checkpoints. A finished stage (``DONE.json``) is never run again; an interrupted one
resumes from its newest complete checkpoint. Running a subset (``stages=["1b", "2"]``) needs the stage before the
subset to be finished.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import yaml

from workflows.training.checkpoints import StagePaths, write_json_atomic
from workflows.training.config import ConfigError, TrainConfig
from workflows.training.stage import StageError, StageResult, StepCallback, run_stage

log = logging.getLogger(__name__)


def select_stages(config: TrainConfig, names: Sequence[str] | None) -> list[str]:
    """The stage names to run, in config order. Raises ConfigError for a name the config does not have."""
    order = [s.name for s in config.stages]
    if not names:
        return order
    unknown = [n for n in names if n not in order]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; the config {config.name!r} has stages {order}")
    return [n for n in order if n in set(names)]


def run_pipeline(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    stages: Sequence[str] | None = None,
    workers: int | None = None,
    use_gpu: bool | None = None,
    ray: bool | None = None,
    callbacks: Sequence[StepCallback] = (),
    progress: bool = True,
) -> list[StageResult]:
    """Run the stages of ``config`` (all, or ``stages``) into ``out_dir``.

    Returns:
        one :class:`StageResult` per stage run or skipped, in order.
    Raises:
        StageError: a selected stage's predecessor has not finished, or a stage failed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    selected = select_stages(config, stages)
    order = [s.name for s in config.stages]
    (out / "config.yaml").write_text(yaml.safe_dump(_config_record(config), sort_keys=False))
    results: list[StageResult] = []
    for name in selected:
        index = order.index(name)
        init = None
        if index > 0:
            prev = StagePaths(out, order[index - 1])
            if not prev.is_done():
                raise StageError(
                    f"stage {name} starts from stage {prev.stage}'s model, but stage {prev.stage} has not finished "
                    f"(no {prev.done}); run it first"
                )
            init = prev.model
        result = run_stage(
            config, name, out, init, workers=workers, use_gpu=use_gpu, ray=ray, callbacks=callbacks, progress=progress
        )
        results.append(result)
    write_json_atomic(
        out / "pipeline.json",
        {"config": config.name, "stages": {r.stage: {"skipped": r.skipped, **r.done} for r in results}},
    )
    return results


def _config_record(config: TrainConfig) -> dict:
    import dataclasses

    return {
        "name": config.name,
        "source": config.source,
        "model": dataclasses.asdict(config.model),
        "data": dataclasses.asdict(config.data),
        "resources": dataclasses.asdict(config.resources),
        "stages": [s.to_dict() for s in config.stages],
    }
