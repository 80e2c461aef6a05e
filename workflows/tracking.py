"""MLflow tracking of a pipeline run: one parent run per pipeline run (one ``run_pipeline`` call, and every call that
resumes it), one nested run per stage.

A stage run holds the stage's config as params (``stage.lr``, ``stage.data.caption``, ...), its world size, ZeRO
stage and trainable parameter counts per part (``trainable_params.mm_projector``), one metric point per optimizer
step (``loss``, ``lr``, ``grad_norm``, ``samples_per_s``, ``tokens_per_s``, ...), the summary of ``DONE.json``,
and as artifacts: ``checkpoint/`` (the stage's output checkpoint with its manifest, :mod:`workflows.artifacts`;
when an artifact store is configured the checkpoint lives there and the run records its URI in
``checkpoint.json`` and the tag ``ola.checkpoint_uri``), ``DONE.json``, and ``eval/report.json`` when a report is
logged (:meth:`PipelineTracker.log_stage_report`).

Where runs go: a tracking server (``http://mlflow:5000``) when one is configured (CLI ``--tracking-uri``, the
config's ``tracking.uri``, or ``MLFLOW_TRACKING_URI``, in that order), else an embedded store:
``sqlite:///.cache/mlflow/mlflow.db`` with artifacts in ``.cache/mlflow/artifacts`` (MLflow 3 deprecates its
file store).

Resuming: the ids are recorded in ``OUT/mlflow.json``. A resumed pipeline reuses its parent run and the run of an
interrupted stage (metrics of steps logged before are not logged again); a stage that was finished and logged is
not logged a second time.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from workflows.artifacts import ArtifactError, open_store
from workflows.training.checkpoints import write_json_atomic

if TYPE_CHECKING:  # the training stack (torch) is not needed to read or write runs
    from workflows.training.config import TrainConfig
    from workflows.training.stage import StageResult, StepCallback

log = logging.getLogger(__name__)

DEFAULT_LOCAL_DIR = Path(".cache/mlflow")
RECORD = "mlflow.json"
TAG_PIPELINE = "ola.pipeline_id"
TAG_STAGE = "ola.stage"
TAG_CHECKPOINT = "ola.checkpoint_uri"
_STEP_KEYS = ("stage", "step", "total_steps")  # in the step metrics dict, but not metrics
_DONE_METRICS = ("first_loss", "final_loss", "mean_loss_last_10", "seconds", "samples_per_s", "samples")
_MAX_PARAM = 6000  # MLflow's limit on a param value


class TrackingError(RuntimeError):
    """MLflow tracking cannot start or a record is inconsistent; the message names the URI or the stage."""


# --------------------------------------------------------------------------------------------------- URIs
def local_tracking_uri(directory: str | Path = DEFAULT_LOCAL_DIR) -> str:
    """The embedded store: ``sqlite:///<directory>/mlflow.db`` (absolute; the directory is created)."""
    directory = Path(directory).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{directory / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri`` (the CLI's or the config's), else ``MLFLOW_TRACKING_URI``, else the embedded store."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri()


def local_artifact_root(tracking_uri: str) -> Path | None:
    """For an embedded ``sqlite:///<dir>/x.db`` store: ``<dir>/artifacts`` (MLflow would use ``./mlruns``)."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts"
    if tracking_uri.startswith("file:"):
        return Path(urlparse(tracking_uri).path) / "artifacts"
    return None


def check_server(tracking_uri: str, timeout: float = 10.0) -> None:
    """For an ``http(s)`` tracking URI: its ``/health`` answers, else TrackingError (MLflow's client would retry
    for minutes before failing)."""
    if urlparse(tracking_uri).scheme not in ("http", "https"):
        return
    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout) as resp:
            if resp.status == 200:
                return
            raise TrackingError(f"MLflow tracking server {tracking_uri}: /health answered {resp.status}")
    except (urllib.error.URLError, OSError) as exc:
        raise TrackingError(f"MLflow tracking server {tracking_uri} is not reachable: {exc}") from exc


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _param(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    text = str(value)
    return text if len(text) <= _MAX_PARAM else text[: _MAX_PARAM - 3] + "..."


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def numeric_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a (nested) report, with dotted keys: ``{"vqa": {"acc": 0.5}}`` -> ``{"vqa.acc": 0.5}``."""
    return {k: n for k, v in _flatten(report).items() if (n := _number(v)) is not None}


# ---------------------------------------------------------------------------------------------- step metrics
class StepMetricsLogger:
    """A :data:`StepCallback` logging each optimizer step's numbers to a run (one ``log_batch`` per step).

    Picklable (it reconnects in the process it runs in, e.g. a Ray Train worker). Steps up to ``skip_through`` are
    not logged again (a resumed stage). A logging failure is logged once and never stops training.
    """

    def __init__(self, tracking_uri: str, run_id: str, skip_through: int = 0) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.skip_through = skip_through
        self._client: Any = None
        self._warned = False

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    def __call__(self, metrics: dict[str, Any]) -> None:
        step = int(metrics.get("step", 0))
        if step <= self.skip_through:
            return
        try:
            from mlflow.entities import Metric

            if self._client is None:
                from mlflow import MlflowClient

                self._client = MlflowClient(tracking_uri=self.tracking_uri)
            now = int(time.time() * 1000)
            batch = [
                Metric(key, number, now, step)
                for key, value in metrics.items()
                if key not in _STEP_KEYS and (number := _number(value)) is not None
            ]
            self._client.log_batch(self.run_id, metrics=batch, synchronous=True)
        except Exception:
            if not self._warned:
                log.warning("cannot log step metrics to MLflow run %s; training goes on", self.run_id, exc_info=True)
                self._warned = True


# --------------------------------------------------------------------------------------------------- tracker
class PipelineTracker:
    """The MLflow runs of one pipeline run. Create it with :meth:`start`; the pipeline calls :meth:`start_stage`
    before a stage, :meth:`finish_stage` after it, :meth:`fail_stage` when it fails, and :meth:`end` at the end."""

    def __init__(self, client: Any, tracking_uri: str, experiment_id: str, parent_run_id: str, out_dir: Path) -> None:
        self.client = client
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.out_dir = out_dir
        self._record: dict[str, Any] = {}

    # ---- opening
    @classmethod
    def start(
        cls,
        config: TrainConfig,
        out_dir: str | Path,
        *,
        pipeline_id: str,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        stages: list[str] | None = None,
    ) -> PipelineTracker:
        """Open (or reuse, after an interruption) the parent run of the pipeline run in ``out_dir``.

        Args:
            tracking_uri: None: ``MLFLOW_TRACKING_URI``, else the embedded store under ``.cache/mlflow``.
            experiment: the MLflow experiment (default: the config's name); created when missing.
            stages: the stages this call runs (a param of a new parent run).
        Raises:
            TrackingError: the server is unreachable, or the experiment is deleted.
        """
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        out = Path(out_dir)
        uri = resolve_tracking_uri(tracking_uri)
        check_server(uri)
        client = MlflowClient(tracking_uri=uri)
        try:
            experiment_id = _experiment(client, experiment or config.name, uri)
            record = _read_record(out)
            parent = None
            if record.get("tracking_uri") == uri and record.get("parent_run_id"):
                parent = _live_run(client, record["parent_run_id"])
                if parent is None:
                    log.warning("the recorded parent run %s is gone; opening a new one", record["parent_run_id"])
            elif record.get("parent_run_id"):
                log.warning("%s was tracked at %s; opening a new parent run at %s", out, record["tracking_uri"], uri)
            if parent is not None:
                client.update_run(parent.info.run_id, status="RUNNING")
                log.info("resuming MLflow parent run %s (%s)", parent.info.run_id, uri)
                tracker = cls(client, uri, experiment_id, parent.info.run_id, out)
                tracker._record = record
            else:
                run = client.create_run(
                    experiment_id,
                    run_name=config.name,
                    tags={TAG_PIPELINE: pipeline_id, "ola.out_dir": str(out.resolve()), "ola.kind": "pipeline"},
                )
                tracker = cls(client, uri, experiment_id, run.info.run_id, out)
                tracker._record = {"stages": {}}
                tracker._log_params(run.info.run_id, _pipeline_params(config, stages))
                log.info("MLflow parent run %s in experiment %s (%s)", run.info.run_id, experiment_id, uri)
        except MlflowException as exc:
            raise TrackingError(f"MLflow tracking at {uri}: {exc}") from exc
        tracker._record.update(
            tracking_uri=uri, experiment_id=experiment_id, parent_run_id=tracker.parent_run_id, pipeline_id=pipeline_id
        )
        tracker._save()
        return tracker

    # ---- the record
    def _save(self) -> None:
        write_json_atomic(self.out_dir / RECORD, self._record)

    def _stage(self, stage: str) -> dict[str, Any]:
        return self._record.setdefault("stages", {}).get(stage) or {}

    def stage_run_id(self, stage: str) -> str | None:
        """The MLflow run of ``stage`` in this pipeline run, if one was opened."""
        return self._stage(stage).get("run_id")

    def stage_logged(self, stage: str) -> bool:
        """Whether ``stage`` was finished and fully logged (its run is FINISHED)."""
        return bool(self._stage(stage).get("finished"))

    def checkpoint_uri(self, stage: str) -> str | None:
        """Where the logged stage's checkpoint is (a complete artifact URI)."""
        return self._stage(stage).get("checkpoint_uri")

    # ---- stages
    def start_stage(
        self, config: TrainConfig, stage: str, *, world_size: int, init_model: str | Path | None
    ) -> StepCallback:
        """Open the stage's nested run (or reopen the run of an interrupted attempt) and log its params.

        Returns:
            the step callback to pass to ``run_stage``.
        """
        spec = config.stage(stage)
        run_id = self.stage_run_id(stage)
        skip_through = 0
        # A run recorded as finished whose stage is run again (its directory was removed) gets a new run.
        reuse = run_id is not None and not self.stage_logged(stage) and _live_run(self.client, run_id) is not None
        if reuse:
            self.client.update_run(run_id, status="RUNNING")
            history = self.client.get_metric_history(run_id, "loss")
            skip_through = max((m.step for m in history), default=0)
            log.info("stage %s: resuming MLflow run %s (steps up to %d already logged)", stage, run_id, skip_through)
        else:
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"stage {stage}",
                tags={
                    "mlflow.parentRunId": self.parent_run_id,
                    TAG_STAGE: stage,
                    TAG_PIPELINE: self._record.get("pipeline_id", ""),
                    "ola.kind": "stage",
                },
            )
            run_id = run.info.run_id
            self._record["stages"][stage] = {"run_id": run_id, "finished": False}
            self._save()
        params = {f"stage.{k}": v for k, v in _flatten(spec.to_dict()).items()}
        params.update(
            world_size=world_size,
            zero_stage=spec.zero_stage,
            init_model=str(init_model) if init_model else f"preset {config.model.preset}",
            data_root=str(config.data_root(spec)),
        )
        self._log_params(run_id, params)
        return StepMetricsLogger(self.tracking_uri, run_id, skip_through)

    def finish_stage(self, result: StageResult, *, checkpoint_uri: str | None = None) -> str:
        """Log a finished stage: ``DONE.json``'s summary and per-part trainable counts, the checkpoint (uploaded to
        the run's ``checkpoint/`` artifact unless ``checkpoint_uri`` says where it already is), and end its run.

        Returns:
            the checkpoint's artifact URI.
        """
        run_id = self.stage_run_id(result.stage)
        if run_id is None:
            raise TrackingError(f"stage {result.stage}: no MLflow run was started for it")
        done = result.done
        params: dict[str, Any] = {f"trainable_params.{p}": n for p, n in (done.get("trainable_params") or {}).items()}
        params["trainable_params.total"] = sum((done.get("trainable_params") or {}).values())
        for key in ("precision", "world_size", "resumed_from_step"):
            if done.get(key) is not None:
                params[key] = done[key]
        self._log_params(run_id, params)
        summary = {k: n for k in _DONE_METRICS if (n := _number(done.get(k))) is not None}
        if summary:
            self._log_metrics(run_id, summary, step=int(done.get("steps") or 0))
        self.client.log_dict(run_id, done, "DONE.json")
        if checkpoint_uri is None:
            run = self.client.get_run(run_id)
            store = open_store(run.info.artifact_uri, tracking_uri=self.tracking_uri)
            try:
                checkpoint_uri = store.upload_dir(result.model_dir, "checkpoint", overwrite=True)
            except ArtifactError as exc:
                raise TrackingError(f"stage {result.stage}: logging its checkpoint failed: {exc}") from exc
        else:
            self.client.log_dict(run_id, {"uri": checkpoint_uri}, "checkpoint.json")
        self.client.set_tag(run_id, TAG_CHECKPOINT, checkpoint_uri)
        self.client.set_terminated(run_id, "FINISHED")
        self._record["stages"][result.stage] = {"run_id": run_id, "finished": True, "checkpoint_uri": checkpoint_uri}
        self._save()
        log.info("stage %s logged to MLflow run %s; checkpoint %s", result.stage, run_id, checkpoint_uri)
        return checkpoint_uri

    def fail_stage(self, stage: str, status: str = "FAILED") -> None:
        """End the stage's run as FAILED (or KILLED); never raises (it runs while another error propagates)."""
        run_id = self.stage_run_id(stage)
        if run_id is None:
            return
        try:
            self.client.set_terminated(run_id, status)
        except Exception:
            log.warning("cannot mark MLflow run %s %s", run_id, status, exc_info=True)

    def log_stage_report(self, stage: str, report: Mapping[str, Any]) -> None:
        """Log a stage's evaluation report: ``eval/report.json``, and its numbers as ``eval.<key>`` metrics."""
        run_id = self.stage_run_id(stage)
        if run_id is None:
            raise TrackingError(f"stage {stage}: no MLflow run to log its report to")
        try:
            json.dumps(report)
        except (TypeError, ValueError) as exc:
            raise TrackingError(f"stage {stage}: the eval report is not JSON-serialisable: {exc}") from exc
        self.client.log_dict(run_id, dict(report), "eval/report.json")
        numbers = {f"eval.{k}": v for k, v in numeric_metrics(report).items()}
        if numbers:
            self._log_metrics(run_id, numbers, step=0)

    def end(self, status: str = "FINISHED") -> None:
        """End the parent run (FINISHED, FAILED or KILLED)."""
        try:
            self.client.set_terminated(self.parent_run_id, status)
        except Exception:
            if status == "FINISHED":
                raise
            log.warning("cannot mark MLflow run %s %s", self.parent_run_id, status, exc_info=True)
        self._record["status"] = status
        self._save()

    # ---- helpers
    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        items = [Param(k, _param(v)) for k, v in params.items()]
        try:
            for start in range(0, len(items), 100):  # MLflow's batch limit on params
                self.client.log_batch(run_id, params=items[start : start + 100], synchronous=True)
        except MlflowException as exc:
            raise TrackingError(
                f"MLflow run {run_id}: cannot log params ({exc}); a resumed run must keep its settings, "
                f"or remove {self.out_dir / RECORD} to open new runs"
            ) from exc

    def _log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in metrics.items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start : start + 1000], synchronous=True)


def _pipeline_params(config: TrainConfig, stages: list[str] | None) -> dict[str, Any]:
    return {
        "config": config.name,
        "config_source": config.source or "",
        "stages": [s.name for s in config.stages] if stages is None else stages,
        "model.preset": config.model.preset,
        "model.seed": config.model.seed,
        "data.root": config.data.root,
        "data.split": config.data.split,
        "resources.workers": config.resources.workers,
    }


def _read_record(out: Path) -> dict[str, Any]:
    path = out / RECORD
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except ValueError as exc:
        raise TrackingError(f"{path} is not valid JSON ({exc}); remove it to open new MLflow runs") from exc
    if not isinstance(record, dict):
        raise TrackingError(f"{path}: expected a JSON object; remove it to open new MLflow runs")
    return record


def _live_run(client: Any, run_id: str) -> Any:
    """The run, or None when it does not exist (any more) or was deleted."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    return None if run.info.lifecycle_stage == "deleted" else run


def _experiment(client: Any, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created when missing (artifacts next to an embedded store)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise TrackingError(
                f"MLflow experiment {name!r} at {tracking_uri} is deleted; restore it or choose tracking.experiment"
            )
        return found.experiment_id
    root = local_artifact_root(tracking_uri)
    location = str(root / name.replace("/", "_")) if root is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


__all__ = [
    "DEFAULT_LOCAL_DIR",
    "PipelineTracker",
    "StepMetricsLogger",
    "TrackingError",
    "check_server",
    "local_tracking_uri",
    "numeric_metrics",
    "resolve_tracking_uri",
]
