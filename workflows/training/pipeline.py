"""Run the stages of a training config in order (Ola's progressive modality alignment).

Each stage starts from the previous stage's output model (``OUT/stages/<prev>/model``); the first starts from the
config's preset and component checkpoints. A finished stage (``DONE.json``) is never run again; an interrupted one
resumes from its newest complete checkpoint. Running a subset (``stages=["1b", "2"]``) needs the stage before the
subset to be finished.

Around the stages (each optional, see the config's ``tracking``, ``artifacts`` and ``registry`` sections):

- MLflow tracking (:mod:`workflows.tracking`): a parent run for the pipeline run, a nested run per stage with its
  params, per-step metrics, checkpoint and eval report; on by default, into the embedded store ``.cache/mlflow``.
- an artifact store (:mod:`workflows.artifacts`): with ``artifacts.uri`` (``s3://bucket/prefix``), each finished
  stage's checkpoint is uploaded to ``<uri>/<config>/<pipeline id>/<stage>/model`` (manifest written last).
- evaluation: an ``evaluator(stage, model_dir) -> report`` callable; the report is kept in
  ``OUT/stages/<stage>/eval_report.json``, logged to the stage run, and its numbers tag the registered version.
- the model registry (:mod:`workflows.lifecycle.registry`): each finished stage is registered as a version of
  ``registry.model_name`` (default ``ola``), chained to the previous stage's version (needs tracking).

The pipeline run's id (``pipeline_id``) is kept in ``OUT/pipeline.json``, so a resumed run keeps its MLflow parent
run, its artifact keys and its registered versions.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from workflows.training.checkpoints import StagePaths, write_json_atomic
from workflows.training.config import ConfigError, TrainConfig
from workflows.training.stage import StageError, StageResult, StepCallback, run_stage

log = logging.getLogger(__name__)

Evaluator = Callable[[str, Path], Mapping[str, Any]]  # (stage name, its model dir) -> a JSON report
EVAL_REPORT = "eval_report.json"


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
    tracking: bool | None = None,
    tracking_uri: str | None = None,
    artifacts_uri: str | None = None,
    register: bool | None = None,
    evaluator: Evaluator | None = None,
) -> list[StageResult]:
    """Run the stages of ``config`` (all, or ``stages``) into ``out_dir``.

    Args:
        tracking: MLflow tracking on or off (default ``config.tracking.enabled``, true).
        tracking_uri: the tracking server or store (default ``config.tracking.uri``, then ``MLFLOW_TRACKING_URI``,
            then the embedded ``.cache/mlflow``).
        artifacts_uri: an artifact store for stage checkpoints (default ``config.artifacts.uri``; None: they stay in
            ``out_dir`` only, and the stage runs hold a copy).
        register: register finished stages in the model registry (default ``config.registry.register``, true when
            tracking is on; asking for it with tracking off is a ConfigError).
        evaluator: called once per finished stage with (stage, model dir); its JSON report is logged and tagged.
    Returns:
        one :class:`StageResult` per stage run or skipped, in order.
    Raises:
        StageError: a selected stage's predecessor has not finished, or a stage failed.
        ConfigError: registration asked for without tracking.
        TrackingError / ArtifactError / RegistryError: MLflow, the artifact store or the registry failed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    selected = select_stages(config, stages)
    order = [s.name for s in config.stages]
    _check_predecessors(out, order, selected)
    track = config.tracking.enabled if tracking is None else tracking
    do_register = config.registry.register if register is None else register
    if do_register and not track:
        if register:
            raise ConfigError("registration needs MLflow tracking, which is off; drop --register or --no-tracking")
        log.info("tracking is off: finished stages are not registered")
        do_register = False
    (out / "config.yaml").write_text(yaml.safe_dump(_config_record(config), sort_keys=False))
    pipeline_id = _pipeline_id(out, config)
    hooks = _Hooks.open(config, out, pipeline_id, selected, track, tracking_uri, artifacts_uri, do_register, evaluator)
    results: list[StageResult] = []
    summary: dict[str, dict[str, Any]] = {}
    try:
        for name in selected:
            index = order.index(name)
            init = StagePaths(out, order[index - 1]).model if index > 0 else None
            was_done = StagePaths(out, name).is_done()
            # tracking first: a callback that stops training still finds its step logged
            stage_callbacks = [*hooks.before_stage(name, was_done, init, workers), *callbacks]
            try:
                result = run_stage(
                    config,
                    name,
                    out,
                    init,
                    workers=workers,
                    use_gpu=use_gpu,
                    ray=ray,
                    callbacks=stage_callbacks,
                    progress=progress,
                )
                results.append(result)
                summary[name] = {"skipped": result.skipped, **result.done, **hooks.after_stage(result, index)}
            except BaseException as exc:
                hooks.stage_failed(name, exc)
                raise
    except BaseException as exc:
        hooks.pipeline_failed(exc)
        raise
    hooks.pipeline_done()
    write_json_atomic(out / "pipeline.json", {"config": config.name, "pipeline_id": pipeline_id, "stages": summary})
    return results


def _check_predecessors(out: Path, order: list[str], selected: list[str]) -> None:
    """Each selected stage's predecessor is selected too (it runs first) or already finished."""
    for name in selected:
        index = order.index(name)
        if index == 0 or order[index - 1] in selected:
            continue
        prev = StagePaths(out, order[index - 1])
        if not prev.is_done():
            raise StageError(
                f"stage {name} starts from stage {prev.stage}'s model, but stage {prev.stage} has not finished "
                f"(no {prev.done}); run it first"
            )


def _pipeline_id(out: Path, config: TrainConfig) -> str:
    """The pipeline run's id: the one in ``OUT/pipeline.json``, else a new one (recorded there at once)."""
    path = out / "pipeline.json"
    record: dict[str, Any] = {}
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except ValueError:
            log.warning("%s is not valid JSON; starting a new pipeline id", path)
    if isinstance(record, dict) and isinstance(record.get("pipeline_id"), str) and record["pipeline_id"]:
        return record["pipeline_id"]
    pipeline_id = uuid.uuid4().hex
    stages = record.get("stages", {}) if isinstance(record, dict) else {}
    write_json_atomic(path, {"config": config.name, "pipeline_id": pipeline_id, "stages": stages})
    return pipeline_id


def _key_part(text: str) -> str:
    """``text`` as one artifact key segment."""
    return re.sub(r"[^A-Za-z0-9._@+=-]", "-", text).lstrip(".-") or "pipeline"


class _Hooks:
    """Tracking, artifact uploads, evaluation and registration around the stages (each may be off)."""

    def __init__(self, config: TrainConfig, out: Path, pipeline_id: str, evaluator: Evaluator | None) -> None:
        self.config = config
        self.out = out
        self.pipeline_id = pipeline_id
        self.evaluator = evaluator
        self.order = [s.name for s in config.stages]
        self.store: Any = None
        self.tracker: Any = None
        self.registry: Any = None

    @classmethod
    def open(
        cls,
        config: TrainConfig,
        out: Path,
        pipeline_id: str,
        selected: list[str],
        track: bool,
        tracking_uri: str | None,
        artifacts_uri: str | None,
        register: bool,
        evaluator: Evaluator | None,
    ) -> _Hooks:
        hooks = cls(config, out, pipeline_id, evaluator)
        artifacts_uri = artifacts_uri or config.artifacts.uri
        if artifacts_uri:
            from workflows.artifacts import open_store

            hooks.store = open_store(artifacts_uri, endpoint_url=config.artifacts.endpoint_url)
        if track:
            from workflows.tracking import PipelineTracker

            hooks.tracker = PipelineTracker.start(
                config,
                out,
                pipeline_id=pipeline_id,
                tracking_uri=tracking_uri or config.tracking.uri,
                experiment=config.tracking.experiment,
                stages=selected,
            )
        if register:
            from workflows.lifecycle.registry import ModelRegistry

            hooks.registry = ModelRegistry(hooks.tracker.tracking_uri, s3_endpoint_url=config.artifacts.endpoint_url)
        return hooks

    def before_stage(self, name: str, was_done: bool, init: Path | None, workers: int | None) -> list[StepCallback]:
        if self.tracker is None or was_done:
            return []
        world = workers or self.config.resources.workers
        return [self.tracker.start_stage(self.config, name, world_size=world, init_model=init)]

    def after_stage(self, result: StageResult, index: int) -> dict[str, Any]:
        """Upload, evaluate, log and register a finished stage (each step idempotent). Returns summary entries."""
        entry: dict[str, Any] = {}
        if not result.finished:
            return entry
        name = result.stage
        checkpoint_uri = None
        if self.store is not None:
            key = f"{_key_part(self.config.name)}/{self.pipeline_id}/{name}/model"
            checkpoint_uri = self.store.upload_dir(result.model_dir, key)
            entry["artifact_uri"] = checkpoint_uri
        report = self._report(name, result.model_dir)
        tracker = self.tracker
        if tracker is not None:
            if tracker.stage_logged(name):
                log.info("stage %s is already logged to MLflow run %s", name, tracker.stage_run_id(name))
            elif tracker.stage_run_id(name) is not None:
                if report is not None:
                    tracker.log_stage_report(name, report)
                tracker.finish_stage(result, checkpoint_uri=checkpoint_uri)
            else:
                log.info("stage %s finished before tracking was on; it has no MLflow run", name)
            entry["mlflow_run_id"] = tracker.stage_run_id(name)
        if self.registry is not None and tracker is not None and tracker.stage_logged(name):
            entry["registered"] = self._register(result, index, checkpoint_uri or tracker.checkpoint_uri(name), report)
        return entry

    def _report(self, name: str, model_dir: Path) -> dict[str, Any] | None:
        """The stage's eval report: the kept one, else the evaluator's (kept in the stage dir), else None."""
        path = StagePaths(self.out, name).root / EVAL_REPORT
        if path.is_file():
            return json.loads(path.read_text())
        if self.evaluator is None:
            return None
        report = dict(self.evaluator(name, model_dir))
        try:
            json.dumps(report)
        except (TypeError, ValueError) as exc:
            raise StageError(f"stage {name}: the evaluator's report is not JSON-serialisable: {exc}") from exc
        write_json_atomic(path, report)
        return report

    def _register(
        self, result: StageResult, index: int, source: str | None, report: Mapping[str, Any] | None
    ) -> dict[str, str]:
        from workflows.lifecycle.registry import dataset_manifest_hash
        from workflows.tracking import numeric_metrics

        model_name = self.config.registry.model_name
        parent = None
        if index > 0:
            parent = self.registry.find_version(model_name, pipeline_id=self.pipeline_id, stage=self.order[index - 1])
        version = self.registry.register_stage_output(
            result.model_dir,
            stage=result.stage,
            pipeline_id=self.pipeline_id,
            name=model_name,
            source=source,
            run_id=self.tracker.stage_run_id(result.stage),
            parent_version=parent.version if parent is not None else None,
            dataset_hash=dataset_manifest_hash(self.config.data_root(self.config.stage(result.stage))),
            config_name=self.config.name,
            eval_metrics=numeric_metrics(report) if report else None,
            description=self.config.stage(result.stage).description or None,
        )
        return {"name": model_name, "version": version}

    def stage_failed(self, name: str, exc: BaseException) -> None:
        if self.tracker is not None:
            self.tracker.fail_stage(name, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")

    def pipeline_failed(self, exc: BaseException) -> None:
        if self.tracker is not None:
            self.tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")

    def pipeline_done(self) -> None:
        if self.tracker is not None:
            self.tracker.end("FINISHED")


def _config_record(config: TrainConfig) -> dict:
    import dataclasses

    return {
        "name": config.name,
        "source": config.source,
        "model": dataclasses.asdict(config.model),
        "data": dataclasses.asdict(config.data),
        "resources": dataclasses.asdict(config.resources),
        "stages": [s.to_dict() for s in config.stages],
        "tracking": dataclasses.asdict(config.tracking),
        "artifacts": dataclasses.asdict(config.artifacts),
        "registry": dataclasses.asdict(config.registry),
    }
