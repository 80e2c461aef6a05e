"""The paper's Fig. 3 comparison: progressive modality alignment vs all data mixed in one stage, at equal steps.

    .venv/bin/python -m bench.progressive_vs_mixed --base OUT/stages/0a/model --eval-data DIR
        [--config workflows/configs/tiny.yaml] [--data DIR] [--scale 1.0] [--out DIR] [--limit N] [--json OUT]

Both arms start from the same model (``--base``: the tiny recipe's stage-0a output: stages 0v and 0a pretrain the
tiny encoders and LLM; the paper's arms likewise both start from pretrained components). Then:

- **progressive**: the config's stages after ``0a`` in order (1a, 1b, 2, 3a, 3b), each with its own trainable parts,
  data mix, learning rate and steps, each starting from the previous one's model;
- **mixed**: one stage with every task of those stages at once (each task at the largest weight any stage gives it),
  the union of their trainable parts, the largest learning rate of the full-model stages (1b, 2, 3b) and as many
  steps as the progressive stages together.

Both arms read one dataset, the config's ``data.root`` or ``--data`` (a stage's own ``data_root`` is dropped, so
the comparison is of the schedules, not of the data). ``--scale`` multiplies every stage's steps (for quick runs).
Both models are evaluated with ``workflows.eval`` on the same split of ``--eval-data`` (a dataset of a seed training
never saw), and the per-modality scores are printed side by side with the difference. Both arms run in this process
one after the other.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import format_table, machine_info, write_json
from workflows.eval.runner import SYNTH_METRICS

LOWER_IS_BETTER = {"asr_wer"}


def _scaled(stage, scale: float):
    steps = max(1, math.ceil((stage.steps or 1) * scale))
    return dataclasses.replace(stage, steps=steps, save_every=10**9, data_root=None)


def arms(config, scale: float, first: str = "0a"):
    """The progressive stages (after ``first``) and the one mixed stage with the same total steps, all reading the
    config's ``data.root``."""
    names = [s.name for s in config.stages]
    progressive = [_scaled(s, scale) for s in config.stages[names.index(first) + 1 :]]
    if not progressive:
        raise ValueError(f"config {config.name!r} has no stages after {first!r}")
    if any(s.steps is None for s in config.stages[names.index(first) + 1 :]):
        raise ValueError("every progressive stage needs `steps` (not epochs) to match the step budget")
    data: dict[str, float] = {}
    trainable: list[str] = []
    for s in progressive:
        for task, weight in s.data.items():
            data[task] = max(weight, data.get(task, 0.0))
        trainable += [p for p in s.trainable if p not in trainable]
    full = [s for s in progressive if "llm" in s.trainable] or progressive
    mixed = dataclasses.replace(
        full[0],
        name="mixed",
        description="every task of the progressive stages at once",
        trainable=tuple(trainable),
        data=data,
        steps=sum(s.steps for s in progressive),
        lr=max(s.lr for s in full),
    )
    return progressive, mixed


def _train(config, stages, out: Path, base: Path) -> Path:
    from workflows.training.stage import run_stage, shutdown_distributed

    config = dataclasses.replace(config, stages=list(stages))
    init: Path = base
    for stage in stages:
        result = run_stage(config, stage.name, out, init, progress=True)
        init = result.model_dir
    shutdown_distributed()
    return init


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=Path("workflows/configs/tiny.yaml"))
    p.add_argument("--base", type=Path, required=True, help="the model both arms start from (stage 0a's output)")
    p.add_argument("--data", type=Path, default=None, help="training data root (default: the config's)")
    p.add_argument("--eval-data", type=Path, required=True, help="a dataset of a seed the training never saw")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N samples per task")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps")
    p.add_argument("--out", type=Path, default=None, help="where both arms train (default: a temporary directory)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    from workflows.eval.runner import evaluate
    from workflows.training.config import load_config

    config = load_config(args.config)
    config.tracking.enabled = False
    if args.data is not None:
        config.data.root = str(args.data)
    progressive, mixed = arms(config, args.scale)
    with tempfile.TemporaryDirectory(prefix="prog-vs-mixed-") as tmp:
        out = args.out or Path(tmp)
        timings: dict[str, float] = {}
        models: dict[str, Path] = {}
        for arm, stages in (("progressive", progressive), ("mixed", [mixed])):
            start = time.perf_counter()
            models[arm] = _train(config, stages, out / arm, args.base)
            timings[arm] = time.perf_counter() - start
        reports = {
            arm: evaluate(model, args.eval_data, split=args.split, limit=args.limit, progress=True)
            for arm, model in models.items()
        }
    rows: list[dict[str, Any]] = []
    for key in SYNTH_METRICS:
        a, b = reports["progressive"][key], reports["mixed"][key]
        better = None
        if a is not None and b is not None:
            better = "progressive" if (a < b if key in LOWER_IS_BETTER else a > b) else "mixed" if a != b else "tie"
        rows.append(
            {"metric": key, "progressive": a, "mixed": b, "diff": None if better is None else a - b, "better": better}
        )
    print(f"steps: progressive {[(s.name, s.steps) for s in progressive]}, mixed {mixed.steps}")
    print(f"train seconds: progressive {timings['progressive']:.0f}, mixed {timings['mixed']:.0f}")
    columns = [("metric", "metric"), ("progressive", "progressive"), ("mixed", "mixed"), ("diff", "diff")]
    print(format_table(rows, [*columns, ("better", "better")]))
    if args.json:
        write_json(
            args.json,
            {
                "rows": rows,
                "steps": {"progressive": {s.name: s.steps for s in progressive}, "mixed": mixed.steps},
                "train_seconds": timings,
                "reports": {arm: r.to_json() for arm, r in reports.items()},
                **machine_info(),
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
