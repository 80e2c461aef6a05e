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
    run.set_defaults(func=cmd_pipeline_run)


def cmd_pipeline_run(args: argparse.Namespace) -> int:
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
        )
    except (ConfigError, StageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    for r in results:
        state = "skipped (done before)" if r.skipped else "done"
        loss = r.done.get("final_loss")
        print(
            f"stage {r.stage}: {state}; model {r.model_dir}" + (f"; final loss {loss:.4f}" if loss is not None else "")
        )
    return 0
