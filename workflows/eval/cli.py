"""``ola eval``: per-modality metrics of a checkpoint on a synthetic split, or on a standard benchmark.

    ola eval [--checkpoint DIR] --data DIR [--split test] [--json OUT.json] [--limit N] [--batch-size N]
    ola eval [--checkpoint DIR] --benchmark librispeech|mmbench|videomme --bench-path PATH [...]

Without ``--checkpoint`` the shipped demo model (``ola_model.demo.demo_checkpoint_dir()``) is evaluated. Prints a
table (metric, value, n) to stdout; ``--json`` writes the metrics at the top level plus ``counts``, ``errors`` and
``meta``. Bad arguments, a missing dataset and an unusable checkpoint exit with status 2 and a message.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from workflows.data.manifest import write_atomic
from workflows.data.world import SPLITS
from workflows.eval.benchmarks import BENCHMARKS, evaluate_benchmark
from workflows.eval.errors import EvalError
from workflows.eval.runner import EvalReport, evaluate

log = logging.getLogger(__name__)


def format_table(report: EvalReport) -> str:
    """Metric, value and sample count per line; ``-`` for a metric with no samples."""
    width = max([len("metric"), *(len(k) for k in report.metrics)]) + 2
    lines = ["metric".ljust(width) + "value".rjust(10) + "n".rjust(8)]
    for key, value in report.metrics.items():
        shown = "-" if value is None else f"{value:.4f}"
        lines.append(key.ljust(width) + shown.rjust(10) + f"{report.counts[key]:8d}")
    errors = len(report.errors)
    tail = f"; {errors} could not be answered (scored as empty answers)" if errors else ""
    lines.append(f"{len(report.results)} items in {report.seconds:.1f} s{tail}")
    return "\n".join(lines)


def _checkpoint(args: argparse.Namespace) -> tuple[Path, str]:
    """The checkpoint directory to evaluate and how it was chosen ("given" or "demo")."""
    if args.checkpoint is not None:
        if not args.checkpoint.is_dir():
            raise EvalError(f"--checkpoint {args.checkpoint}: no such directory")
        return args.checkpoint, "given"
    try:
        from ola_model.demo import demo_checkpoint_dir
    except ImportError as exc:
        raise EvalError(
            f"no --checkpoint given and the demo model is not available ({exc}); pass --checkpoint DIR"
        ) from exc
    try:
        return Path(demo_checkpoint_dir()), "demo"
    except FileNotFoundError as exc:
        raise EvalError(f"no --checkpoint given and the demo checkpoint is missing: {exc}") from exc


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())


def _write_predictions(path: Path, report: EvalReport) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in report.results)
    write_atomic(path, lines.encode("utf-8"))


def cmd_eval(args: argparse.Namespace) -> int:
    if (args.data is None) == (args.benchmark is None):
        raise EvalError("give either --data DIR (a synthetic dataset) or --benchmark NAME --bench-path PATH")
    if args.benchmark is not None and args.bench_path is None:
        raise EvalError(f"--benchmark {args.benchmark} needs --bench-path PATH (its files on local disk)")
    if args.data is not None and not args.data.is_dir():
        raise EvalError(f"--data {args.data}: no such directory (generate one with `ola data synth --out DIR`)")
    if args.bench_path is not None and not args.bench_path.exists():
        raise EvalError(f"--bench-path {args.bench_path}: no such file or directory")
    for flag in ("limit", "batch_size", "max_frames"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise EvalError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    ckpt, source = _checkpoint(args)
    log.info("evaluating %s checkpoint %s", source, ckpt)
    # The data or benchmark files are read and checked before the (possibly large) checkpoint loads.
    progress = not args.no_progress
    if args.data is not None:
        report = evaluate(
            ckpt,
            args.data,
            split=args.split,
            limit=args.limit,
            batch_size=args.batch_size,
            progress=progress,
            max_video_frames=args.max_frames,
            device=args.device,
            tasks=[t.strip() for t in args.tasks.split(",")] if args.tasks else None,
        )
    else:
        options = {}
        if args.benchmark == "videomme":
            options = {
                "videos_dir": args.videos_dir,
                "skip_missing": args.skip_missing,
                "use_video_audio": args.video_audio,
                "max_video_frames": args.max_frames,
            }
        report = evaluate_benchmark(
            ckpt,
            args.benchmark,
            args.bench_path,
            limit=args.limit,
            batch_size=args.batch_size,
            progress=progress,
            device=args.device,
            **options,
        )
    report.meta.update({"checkpoint": str(ckpt.resolve()), "checkpoint_source": source})
    print(format_table(report))
    if args.json is not None:
        _write_json(args.json, report.to_json())
        log.info("wrote %s", args.json)
    if args.predictions is not None:
        _write_predictions(args.predictions, report)
        log.info("wrote %s", args.predictions)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval`` to the ``ola`` command's subparsers."""
    p = subparsers.add_parser(
        "eval",
        help="per-modality metrics of a checkpoint on a synthetic split or a standard benchmark",
        description="Greedy, batched evaluation. Synthetic data (--data): image_qa / ocr / video_qa / "
        "video_audio_qa (with and without the video's audio) / sound_qa / spoken_image_qa accuracy, asr WER and "
        "caption scores. Benchmarks (--benchmark): librispeech WER, mmbench and videomme multiple-choice accuracy.",
    )
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: the shipped demo model)")
    p.add_argument("--data", type=Path, help="an ola-synth/1 dataset directory (`ola data synth --out`)")
    p.add_argument("--split", choices=SPLITS, default="test", help="split of --data (default test)")
    p.add_argument("--benchmark", choices=BENCHMARKS, help="a standard benchmark instead of --data")
    p.add_argument("--bench-path", type=Path, help="the benchmark's files: LibriSpeech dir, MMBench TSV, Video-MME")
    p.add_argument("--videos-dir", type=Path, help="videomme: directory of <videoID>.mp4 (default: found nearby)")
    p.add_argument("--skip-missing", action="store_true", help="videomme: skip questions whose video is absent")
    p.add_argument("--video-audio", action="store_true", help="videomme: give the model the videos' audio too")
    p.add_argument("--json", type=Path, help="write the metrics, counts and meta as JSON here")
    p.add_argument("--predictions", type=Path, help="write every answer and its scores as JSON lines here")
    p.add_argument("--limit", type=int, help="at most N samples per task (benchmarks: the first N questions)")
    p.add_argument("--tasks", help="--data: only these tasks, comma-separated (e.g. image_qa,ocr; default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--max-frames", type=int, help="video frames sampled per video (default: the model's limit)")
    p.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)
