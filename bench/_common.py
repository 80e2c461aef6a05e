"""Helpers shared by the benchmarks: timing with device synchronisation, tables, JSON output, machine facts."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock times cover the work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; the timed durations in seconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """Facts that make a result reproducible: CPU count, threads, library versions, GPU name, date."""
    info: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain-text table: ``columns`` are (key, header) pairs; floats are shown with 4 significant digits."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
        return str(value)

    headers = [header for _, header in columns]
    body = [[cell(row.get(key)) for key, _ in columns] for row in rows]
    # Numbers right-aligned, text left-aligned, per column (decided by the first row).
    numeric = [bool(rows) and isinstance(rows[0].get(key), int | float | None) for key, _ in columns]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric, strict=True)]
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in body)])


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_results(args: Any, results: Any) -> None:
    """Write ``{"args", "results", "machine"}`` to ``args.json`` when it is set (the parsed arguments as strings)."""
    if args.json is not None:
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results, "machine": machine_info()}
        write_json(args.json, payload)


def run_and_report(
    args: Any, run: Callable[[Any], dict[str, Any]], report: Callable[[dict[str, Any]], str]
) -> dict[str, Any]:
    """What a benchmark's main does with its parsed arguments: run, print the report, write ``args.json`` if set."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = run(args)
    print(report(result))
    if args.json is not None:
        write_json(args.json, result)
    return result
