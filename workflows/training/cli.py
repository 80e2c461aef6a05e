"""``ola pipeline run``: stage training from a YAML config (an ``ola.cli`` entry point: ``register(subparsers)``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Add the ``pipeline`` command group to the ``ola`` command line."""
    pipeline = subparsers.add_parser("pipeline", help="stage training: Ola's progressive modality alignment")
    sub = pipeline.add_subparsers(dest="pipeline_command", required=True)
    from workflows.api.cli import add_pipeline_client_commands

    add_pipeline_client_commands(sub)  # start | get | list | watch | cancel, through the PipelineService API
    run = sub.add_parser(
        "run",
        help="run the stages of a training config in order (finished stages are skipped, interrupted ones resume)",
    )
    run.add_argument("--config", type=Path, required=True, help="a training YAML (workflows/configs/*.yaml)")
    run.add_argument("--out", type=Path, default=None, help="output directory (default .cache/train/<config name>)")
    run.add_argument("--workers", type=int, default=None, help="data-parallel workers (default: the config's)")
    run.add_argument("--stages", default=None, help="comma-separated stage names to run, e.g. 1a,1b (default: all)")
    run.add_argument("--data-root", type=Path, default=None, help="override data.root of the config")
    run.add_argument("--ray", action="store_true", help="run on Ray Train even with one worker")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where workers train")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking server or store (default: the config's tracking.uri, $MLFLOW_TRACKING_URI, "
        "else the embedded sqlite:///.cache/mlflow/mlflow.db)",
    )
    run.add_argument("--no-tracking", action="store_true", help="no MLflow at all (no runs, no registration)")
    run.add_argument(
        "--artifacts",
        default=None,
        metavar="URI",
        help="artifact store for stage checkpoints: s3://bucket/prefix (MinIO / S3) or a directory "
        "(default: the config's artifacts.uri; none: they stay in the output directory)",
    )
    run.add_argument(
        "--register",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="register finished stages in the MLflow model registry (default: the config's registry.register, on)",
    )
    run.add_argument(
        "--eval-data",
        type=Path,
        default=None,
        metavar="DIR",
        help="evaluate every finished stage on this dataset (ola eval; a seed training never saw): the report is "
        "logged to the stage's MLflow run and its metrics tag the registered version",
    )
    run.add_argument("--eval-split", default="test", help="split of --eval-data (default test)")
    run.add_argument("--eval-limit", type=int, default=None, help="at most N samples per task (default: all)")
    run.add_argument("--eval-max-frames", type=int, default=None, help="video frames per clip (default: the model's)")
    run.set_defaults(func=cmd_pipeline_run)


def stage_evaluator(data: Path, split: str = "test", limit: int | None = None, max_video_frames: int | None = None):
    """A ``run_pipeline`` evaluator: ``(stage, model_dir) -> report JSON`` with ``workflows.eval``."""

    def evaluate_stage(stage: str, model_dir: Path) -> dict:
        from workflows.eval import evaluate

        log.info("stage %s: evaluating %s on %s (%s)", stage, model_dir, data, split)
        report = evaluate(model_dir, data, split=split, limit=limit, max_video_frames=max_video_frames)
        return report.to_json()

    return evaluate_stage


def cmd_pipeline_run(args: argparse.Namespace) -> int:
    from workflows.artifacts import ArtifactError
    from workflows.lifecycle.errors import RegistryError
    from workflows.tracking import TrackingError
    from workflows.training.config import ConfigError, load_config
    from workflows.training.pipeline import run_pipeline
    from workflows.training.stage import StageError, shutdown_distributed

    try:
        config = load_config(args.config)
        if args.data_root is not None:
            config.data.root = str(args.data_root)
        stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
        out = args.out or Path(".cache/train") / config.name
        use_gpu = None if args.device == "auto" else args.device == "cuda"
        results = run_pipeline(
            config,
            out,
            stages=stages,
            workers=args.workers,
            use_gpu=use_gpu,
            ray=True if args.ray else None,
            progress=not args.no_progress,
            tracking=False if args.no_tracking else None,
            tracking_uri=args.tracking_uri,
            artifacts_uri=args.artifacts,
            register=args.register,
            evaluator=None
            if args.eval_data is None
            else stage_evaluator(args.eval_data, args.eval_split, args.eval_limit, args.eval_max_frames),
        )
    except (ConfigError, StageError, TrackingError, ArtifactError, RegistryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    summary = _summary(out)
    for r in results:
        state = "skipped (done before)" if r.skipped else "done"
        loss = r.done.get("final_loss")
        line = f"stage {r.stage}: {state}; model {r.model_dir}" + (
            f"; final loss {loss:.4f}" if loss is not None else ""
        )
        registered = summary.get(r.stage, {}).get("registered")
        if registered:
            line += f"; registered {registered['name']} version {registered['version']}"
        print(line)
    return 0


def _summary(out: Path) -> dict:
    """The per-stage entries of ``OUT/pipeline.json`` (empty when it cannot be read)."""
    import json

    try:
        return json.loads((out / "pipeline.json").read_text()).get("stages", {})
    except (OSError, ValueError, AttributeError):
        return {}
