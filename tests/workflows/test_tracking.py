"""MLflow tracking of a real two-stage tiny pipeline against a real ``mlflow server`` (sqlite backend, artifacts
proxied to a moto S3 bucket): a parent run with nested stage runs, per-step metrics, checkpoints and eval reports
in S3, an interrupted run resumed into the same runs, and nothing logged twice."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ola_model.checkpoint.ola_format import load_checkpoint
from workflows.artifacts import MANIFEST
from workflows.tracking import (
    TAG_CHECKPOINT,
    TrackingError,
    local_artifact_root,
    local_tracking_uri,
    numeric_metrics,
    resolve_tracking_uri,
)
from workflows.training.cli import register as register_cli
from workflows.training.config import ConfigError, config_from_dict, load_config
from workflows.training.pipeline import run_pipeline
from workflows.training.smoke_data import write_smoke_dataset

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
MODEL_NAME = "ola-tracking-test"


class Interrupt(Exception):
    """Stands for a crash in the middle of a stage."""


def projector_norm(stage: str, model_dir: Path) -> dict:
    """A real (if small) evaluation: the L2 norm of the vision projector's first weight."""
    model = load_checkpoint(model_dir)
    return {"stage": stage, "projector": {"norm": float(model.mm_projector.proj1.weight.norm())}}


@dataclass
class TrackedRun:
    out: Path
    config_path: Path
    uri: str
    client: object  # MlflowClient
    record: dict  # OUT/mlflow.json
    interrupted_parent: str  # the parent run id recorded by the interrupted attempt


pytestmark = pytest.mark.usefixtures("process_group")


@pytest.fixture(scope="module")
def tracked(mlflow_server: str, s3, tmp_path_factory: pytest.TempPathFactory) -> TrackedRun:
    """One pipeline run, interrupted in stage v at step 3 (after its step-3 metrics were logged, with the last
    checkpoint at step 2), then run again to the end."""
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("tracking")
    write_smoke_dataset(tmp / "data")
    raw = {
        "name": "tracked",
        "model": {"preset": "tiny", "seed": 0},
        "data": {"root": str(tmp / "data")},
        "defaults": {"batch_size": 2, "lr": 1e-3, "steps": 2, "save_every": 1, "max_length": 2048},
        "stages": [
            {"name": "v", "trainable": ["mm_projector"], "data": {"caption": 1.0}, "steps": 3, "save_every": 2},
            {"name": "s", "trainable": ["speech_projector"], "data": ["asr"]},
        ],
        "tracking": {"uri": mlflow_server, "experiment": "tracking-test"},
        "registry": {"model_name": MODEL_NAME},
    }
    config_path = tmp / "tracked.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    out = tmp / "out"

    def crash_at_step_3(metrics: dict) -> None:
        if metrics["stage"] == "v" and metrics["step"] == 3:
            raise Interrupt("simulated crash")

    with pytest.raises(Interrupt):
        run_pipeline(
            load_config(config_path), out, callbacks=[crash_at_step_3], progress=False, evaluator=projector_norm
        )
    interrupted_parent = json.loads((out / "mlflow.json").read_text())["parent_run_id"]
    run_pipeline(load_config(config_path), out, progress=False, evaluator=projector_norm)
    record = json.loads((out / "mlflow.json").read_text())
    return TrackedRun(
        out, config_path, mlflow_server, MlflowClient(tracking_uri=mlflow_server), record, interrupted_parent
    )


def test_parent_and_nested_stage_runs(tracked: TrackedRun) -> None:
    client = tracked.client
    experiment = client.get_experiment_by_name("tracking-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("ola.kind") == "pipeline"]
    stages = {r.data.tags["ola.stage"]: r for r in runs if r.data.tags.get("ola.kind") == "stage"}
    # The interrupted attempt and the resumed one are the same runs: one parent, one run per stage.
    assert len(parents) == 1 and len(runs) == 3 and set(stages) == {"v", "s"}
    parent = parents[0]
    assert parent.info.run_id == tracked.record["parent_run_id"] == tracked.interrupted_parent
    assert parent.info.status == "FINISHED"
    pipeline_id = json.loads((tracked.out / "pipeline.json").read_text())["pipeline_id"]
    assert parent.data.tags["ola.pipeline_id"] == pipeline_id and parent.data.params["stages"] == "v,s"
    for name, run in stages.items():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED" and run.info.run_name == f"stage {name}"
        assert run.info.run_id == tracked.record["stages"][name]["run_id"]


def test_stage_params_metrics_and_summary(tracked: TrackedRun) -> None:
    client = tracked.client
    v = client.get_run(tracked.record["stages"]["v"]["run_id"])
    done = json.loads((tracked.out / "stages" / "v" / "DONE.json").read_text())
    params = v.data.params
    assert (
        params["stage.lr"] == "0.001" and params["stage.steps"] == "3" and params["stage.trainable"] == "mm_projector"
    )
    assert params["stage.data.caption"] == "1.0" and params["world_size"] == "1" and params["zero_stage"] == "2"
    assert params["trainable_params.mm_projector"] == str(done["trainable_params"]["mm_projector"]) != "0"
    assert params["trainable_params.llm"] == "0" and params["resumed_from_step"] == "2"
    # One point per optimizer step, none twice although step 3 ran twice (before and after the crash).
    loss = client.get_metric_history(v.info.run_id, "loss")
    assert sorted(m.step for m in loss) == [1, 2, 3]
    assert {m.key for m in [*client.get_metric_history(v.info.run_id, "lr")]} == {"lr"}
    lines = [json.loads(line) for line in (tracked.out / "stages" / "v" / "metrics.jsonl").read_text().splitlines()]
    by_step = {m.step: m.value for m in loss}
    assert by_step[1] == pytest.approx(lines[0]["loss"]) and by_step[2] == pytest.approx(lines[1]["loss"])
    assert v.data.metrics["final_loss"] == pytest.approx(done["final_loss"])
    s = client.get_run(tracked.record["stages"]["s"]["run_id"])
    assert sorted(m.step for m in client.get_metric_history(s.info.run_id, "loss")) == [1, 2]
    assert {"tokens_per_s", "samples_per_s", "step_seconds"} <= set(s.data.metrics)


def test_checkpoint_and_report_artifacts_are_in_s3(tracked: TrackedRun, s3, tmp_path: Path) -> None:
    client = tracked.client
    for stage in ("v", "s"):
        run = client.get_run(tracked.record["stages"][stage]["run_id"])
        assert run.data.tags[TAG_CHECKPOINT] == tracked.record["stages"][stage]["checkpoint_uri"]
        keys = {obj["Key"] for obj in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="mlflow/").get("Contents", [])}
        under = f"/{run.info.run_id}/artifacts/"
        ours = {k.split(under, 1)[1] for k in keys if under in k}
        assert {f"checkpoint/{MANIFEST}", "checkpoint/config.json", "DONE.json", "eval/report.json"} <= ours
        report = json.loads(
            s3.client.get_object(Bucket=s3.bucket, Key=next(k for k in keys if k.endswith(f"{under}eval/report.json")))[
                "Body"
            ].read()
        )
        kept = json.loads((tracked.out / "stages" / stage / "eval_report.json").read_text())
        assert report == kept and report["stage"] == stage
        assert run.data.metrics["eval.projector.norm"] == pytest.approx(kept["projector"]["norm"])
    # The logged checkpoint of stage s is the stage's model.
    from workflows.artifacts import open_store

    store = open_store(tracked.record["stages"]["s"]["checkpoint_uri"], tracking_uri=tracked.uri)
    got = load_checkpoint(store.download_dir("", tmp_path / "s"))
    want = load_checkpoint(tracked.out / "stages" / "s" / "model")
    assert got.speech_projector.linear1.weight.equal(want.speech_projector.linear1.weight)


def test_rerun_logs_nothing_twice(tracked: TrackedRun, capsys) -> None:
    """A finished pipeline run again: every stage is skipped, no run opens, no metric or version is added."""
    client = tracked.client
    experiment = client.get_experiment_by_name("tracking-test")
    before_runs = len(client.search_runs([experiment.experiment_id]))
    v_run = tracked.record["stages"]["v"]["run_id"]
    versions_before = [mv.version for mv in client.search_model_versions(f"name = '{MODEL_NAME}'")]
    parser = argparse.ArgumentParser(prog="ola")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["pipeline", "run", "--config", str(tracked.config_path), "--out", str(tracked.out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "stage v: skipped (done before)" in printed and "registered ola-tracking-test version" in printed
    assert len(client.search_runs([experiment.experiment_id])) == before_runs
    assert len(client.get_metric_history(v_run, "loss")) == 3
    assert [mv.version for mv in client.search_model_versions(f"name = '{MODEL_NAME}'")] == versions_before
    # --no-tracking touches nothing; asking for registration without tracking is refused before any work.
    args = parser.parse_args([*_argv(tracked), "--no-tracking"])
    assert args.func(args) == 0 and len(client.search_runs([experiment.experiment_id])) == before_runs
    args = parser.parse_args([*_argv(tracked), "--no-tracking", "--register"])
    assert args.func(args) == 2 and "registration needs MLflow tracking" in capsys.readouterr().err


def _argv(tracked: TrackedRun) -> list[str]:
    return ["pipeline", "run", "--config", str(tracked.config_path), "--out", str(tracked.out)]


def test_unreachable_server_is_a_clear_error(tracked: TrackedRun, tmp_path: Path) -> None:
    from workflows.training.stage import free_port

    config = load_config(tracked.config_path)
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError, match=f"MLflow tracking server {dead} is not reachable"):
        run_pipeline(config, tmp_path / "out", tracking_uri=dead, progress=False)


def test_tracking_uri_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri("http://cli:5000") == "http://cli:5000"
    assert resolve_tracking_uri(None) == "http://env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    uri = resolve_tracking_uri(None)
    assert uri == f"sqlite:///{tmp_path / '.cache' / 'mlflow' / 'mlflow.db'}" == local_tracking_uri()
    assert local_artifact_root(uri) == tmp_path / ".cache" / "mlflow" / "artifacts"
    assert local_artifact_root("http://mlflow:5000") is None
    assert numeric_metrics({"a": 1, "b": {"c": 2.5, "d": "x", "e": True}, "f": float("nan")}) == {"a": 1.0, "b.c": 2.5}


def test_config_sections_are_validated() -> None:
    base = {
        "name": "c",
        "model": {"preset": "tiny"},
        "stages": [{"name": "a", "trainable": ["llm"], "data": ["asr"], "steps": 1}],
    }
    config = config_from_dict(
        {
            **base,
            "tracking": {"uri": "http://mlflow:5000", "experiment": "exp"},
            "artifacts": {"uri": "s3://models/ola", "endpoint_url": "http://minio:9000"},
            "registry": {"model_name": "ola-tiny", "register": False},
        }
    )
    assert config.tracking.uri == "http://mlflow:5000" and config.artifacts.uri == "s3://models/ola"
    assert config.registry.model_name == "ola-tiny" and not config.registry.register and config.tracking.enabled
    defaults = config_from_dict(base)
    assert defaults.tracking.uri is None and defaults.registry.model_name == "ola" and defaults.registry.register
    bad = [
        ({"tracking": {"uri": "mlflow"}}, "tracking.uri: expected a URI with a scheme"),
        ({"tracking": {"url": "http://x"}}, r"tracking: unknown key\(s\) \['url'\]"),
        ({"artifacts": {"uri": "gs://bucket"}}, "artifacts.uri: scheme 'gs' is not supported"),
        ({"artifacts": {"uri": "s3://"}}, "artifacts.uri: expected s3://bucket/prefix"),
        ({"artifacts": {"endpoint_url": "minio:9000"}}, r"artifacts.endpoint_url: expected http\(s\)://host"),
        ({"registry": {"model_name": "a/b"}}, "registry.model_name: 'a/b' must match"),
        ({"registry": {"register": "yes"}}, "registry.register: expected true or false"),
    ]
    for extra, message in bad:
        with pytest.raises(ConfigError, match=message):
            config_from_dict({**base, **extra})


def test_step_logger_skips_logged_steps_and_survives_pickling(mlflow_server: str) -> None:
    """The callback travels to Ray Train workers by pickle; it reconnects there and skips steps already logged."""
    import pickle

    from mlflow import MlflowClient

    from workflows.tracking import StepMetricsLogger

    uri = mlflow_server
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("pickled-logger")).info.run_id
    logger = StepMetricsLogger(uri, run_id, skip_through=2)
    for step in (1, 2, 3):
        logger({"stage": "v", "step": step, "total_steps": 4, "loss": 1.0 / step, "lr": 0.1, "note": "text"})
    copy = pickle.loads(pickle.dumps(logger))
    copy({"stage": "v", "step": 4, "total_steps": 4, "loss": 0.25, "lr": 0.1})
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(3, pytest.approx(1 / 3)), (4, 0.25)]
    assert set(client.get_run(run_id).data.metrics) == {"loss", "lr"}
