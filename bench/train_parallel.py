"""Training throughput per worker: DeepSpeed ZeRO-2 vs ZeRO-3 vs plain data parallel (ZeRO off), on Ray Train.

    .venv/bin/python -m bench.train_parallel [--config workflows/configs/tiny.yaml] [--stage 1b] [--steps 20]
        [--workers 1,2] [--modes ddp,zero2,zero3] [--data DIR] [--json OUT]

Each (mode, workers) cell runs the same stage of the same config from the same starting model for ``--steps``
optimizer steps into a fresh directory, and reads the per-step metrics the stage writes (``metrics.jsonl``). The first
``--skip`` steps (warm-up: op builds, allocator) are left out; the table reports the median step time and samples/s
per worker. "ddp" is DeepSpeed with ZeRO stage 0: gradients all-reduced, optimizer state replicated, which is what
plain PyTorch DDP does. All cells run one after the other in one process, so they share the machine's state.

On a 2-core CPU machine, 2 workers share 2 cores, so samples/s per worker halves at best; the comparison between
modes at equal workers is what the table is for.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench._common import format_table, machine_info, write_json

MODES = {"ddp": 0, "zero2": 2, "zero3": 3}


def _config(path: Path, stage: str, mode: str, data: Path | None):
    from workflows.training.config import load_config

    config = load_config(path)
    if data is not None:
        config.data.root = str(data)
    config.tracking.enabled = False
    target = config.stage(stage)
    # precision fp32: ZeRO-3 + bf16 is refused by the stage runner (BEATs stays fp32), so every mode runs fp32
    patched = dataclasses.replace(target, zero_stage=MODES[mode], precision="fp32", save_every=10**9)
    config.stages = [patched]
    return config


def run_cell(config_path: Path, stage: str, mode: str, workers: int, steps: int, skip: int, data: Path | None):
    """Train ``steps`` steps of ``stage`` with ``mode`` on ``workers`` workers; returns the cell's figures."""
    from workflows.training.stage import run_stage, shutdown_distributed

    config = _config(config_path, stage, mode, data)
    with tempfile.TemporaryDirectory(prefix=f"bench-{mode}-{workers}-") as out:
        run_stage(config, stage, out, None, workers=workers, ray=True, max_steps=steps, progress=False)
        shutdown_distributed()
        lines = (Path(out) / "stages" / stage / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines][skip:]
    if not metrics:
        raise RuntimeError(f"{mode} x{workers}: no steps after skipping {skip}")
    step_s = statistics.median(m["step_seconds"] for m in metrics)
    return {
        "mode": mode,
        "zero_stage": MODES[mode],
        "workers": workers,
        "steps_timed": len(metrics),
        "median_step_s": step_s,
        "samples_per_s_per_worker": statistics.median(m["samples_per_s_per_worker"] for m in metrics),
        "samples_per_s": statistics.median(m["samples_per_s"] for m in metrics),
        "final_loss": metrics[-1]["loss"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=Path("workflows/configs/tiny.yaml"))
    p.add_argument("--stage", default="1b", help="the stage to time (it starts from the preset: no earlier stage)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the medians")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--modes", default="ddp,zero2,zero3")
    p.add_argument("--data", type=Path, default=None, help="dataset root (default: the config's data.root)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; known: {sorted(MODES)}")
    rows: list[dict[str, Any]] = []
    for workers in (int(w) for w in args.workers.split(",")):
        for mode in modes:
            rows.append(run_cell(args.config, args.stage, mode, workers, args.steps, args.skip, args.data))
            print(f"done: {mode} x{workers}", flush=True)
    for row in rows:
        base = next(r for r in rows if r["workers"] == row["workers"] and r["mode"] == modes[0])
        row[f"vs_{modes[0]}"] = row["samples_per_s_per_worker"] / base["samples_per_s_per_worker"]
    columns = [
        ("mode", "mode"),
        ("workers", "workers"),
        ("median_step_s", "median step s"),
        ("samples_per_s_per_worker", "samples/s/worker"),
        (f"vs_{modes[0]}", f"vs {modes[0]}"),
        ("final_loss", "loss"),
    ]
    print(format_table(rows, columns))
    if args.json:
        write_json(args.json, {"rows": rows, "args": {k: str(v) for k, v in vars(args).items()}, **machine_info()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
