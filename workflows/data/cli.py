"""``ola data``: generate (``synth``) and check (``verify``) synthetic omni datasets.

Registered into the ``ola`` command through the ``ola.cli`` entry-point group (``register(subparsers)``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from workflows.data.dataset import verify
from workflows.data.synth import SynthParams, SynthReport, synthesize
from workflows.data.world import DEFAULT_MIX, DEFAULT_SPLITS, SPLITS, TASKS


def parse_splits(text: str) -> dict[str, float]:
    """ "0.9,0.05,0.05" -> {"train": 0.9, "val": 0.05, "test": 0.05}."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--splits: expected three numbers like 0.9,0.05,0.05, got {text!r}") from exc
    if len(values) != len(SPLITS):
        raise argparse.ArgumentTypeError(f"--splits: expected {len(SPLITS)} fractions (train,val,test), got {text!r}")
    return dict(zip(SPLITS, values, strict=True))


def parse_tasks(text: str) -> dict[str, float]:
    """ "image_qa=0.5,asr=0.5" -> {"image_qa": 0.5, "asr": 0.5} (weights, normalised later; others get none)."""
    mix: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, weight = item.partition("=")
        if not sep or name not in TASKS:
            raise argparse.ArgumentTypeError(
                f"--tasks: expected TASK=WEIGHT with TASK one of {list(TASKS)}, got {item!r}"
            )
        try:
            mix[name] = float(weight)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"--tasks: weight of {name} is not a number: {weight!r}") from exc
    if not mix:
        raise argparse.ArgumentTypeError("--tasks: no TASK=WEIGHT given")
    return mix


def format_report(report: SynthReport) -> str:
    """A table of counts per task (rows) and split (columns), with totals and the time taken."""
    tasks = [t for t in TASKS if any(t in report.counts[s] for s in SPLITS)]
    width = max(len(t) for t in [*tasks, "total"]) + 2
    lines = ["task".ljust(width) + "".join(s.rjust(8) for s in SPLITS) + "total".rjust(8)]
    for t in tasks:
        row = [report.counts[s].get(t, 0) for s in SPLITS]
        lines.append(t.ljust(width) + "".join(f"{n:8d}" for n in row) + f"{sum(row):8d}")
    totals = [sum(report.counts[s].values()) for s in SPLITS]
    lines.append("total".ljust(width) + "".join(f"{n:8d}" for n in totals) + f"{sum(totals):8d}")
    status = "already generated, nothing to do" if report.skipped else f"generated {report.num_files} files"
    lines.append(f"{report.out}: {status} ({report.seconds:.1f} s)")
    return "\n".join(lines)


def cmd_synth(args: argparse.Namespace) -> int:
    params = SynthParams(
        seed=args.seed,
        size=args.size,
        mix=args.tasks or DEFAULT_MIX,
        splits=args.splits or DEFAULT_SPLITS,
        qa_turns=args.qa_turns,
    )
    report = synthesize(args.out, params, workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress)
    print(format_report(report))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    report = verify(args.dir)
    print(report.summary())
    return 0 if report.ok else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` (with ``synth`` and ``verify``) to the ``ola`` command's subparsers."""
    data = subparsers.add_parser("data", help="synthetic omni datasets: generate and verify")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser(
        "synth",
        help="generate the synthetic omni world (images, speech, sounds, videos) in the ola-synth/1 format",
        description="Deterministic: the same --seed and --size give byte-identical output. A complete DIR with the "
        "same parameters is left alone; a DIR without a manifest (interrupted) is generated again.",
    )
    p.add_argument("--out", type=Path, required=True, help="dataset directory (created)")
    p.add_argument("--seed", type=int, default=0, help="content seed (default 0)")
    p.add_argument("--size", type=int, required=True, help="number of samples over all splits")
    p.add_argument(
        "--workers", type=int, default=len(os.sched_getaffinity(0)), help="worker processes (default: CPU count)"
    )
    p.add_argument(
        "--splits",
        type=parse_splits,
        default=None,
        help="train,val,test fractions adding up to 1 (default 0.9,0.05,0.05)",
    )
    default_mix = ",".join(f"{t}={w:g}" for t, w in DEFAULT_MIX.items())
    p.add_argument(
        "--tasks", type=parse_tasks, default=None, help=f"task mix as TASK=WEIGHT,... (default {default_mix})"
    )
    p.add_argument(
        "--qa-turns",
        type=int,
        default=1,
        help="questions per image-QA sample, as turns of one conversation about its scene (default 1)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a complete dataset made with other parameters")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("verify", help="recompute every file's sha256 against the manifest")
    p.add_argument("dir", type=Path, help="dataset directory")
    p.set_defaults(func=cmd_verify)
