"""A run's training progress, read from its output directory, and the events that lead from one reading to the next.

The training writes (``workflows/training/checkpoints.py``) ``OUT/stages/<stage>/metrics.jsonl`` (one line per
optimizer step: step, total_steps, loss, ...) and ``DONE.json`` when the stage is finished. Reading them needs
nothing but the file system, so it works for any job backend whose output directory the API server can see
(a shared volume on a cluster).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from workflows.training.checkpoints import StagePaths

PENDING, RUNNING, DONE = "PENDING", "RUNNING", "DONE"
_TAIL_BYTES = 8192


@dataclass
class StageProgress:
    """Where one stage is: ``state`` PENDING / RUNNING / DONE, the last step and its loss."""

    name: str
    state: str = PENDING
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageProgress:
        return cls(**{k: data[k] for k in ("name", "state", "step", "total_steps", "loss", "seconds") if k in data})


def _last_metrics(path: Path) -> dict[str, Any] | None:
    """The last complete line of a metrics.jsonl (the one being appended may be half-written)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - _TAIL_BYTES))
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and "step" in data:
            return data
    return None


def read_progress(output_dir: str | Path, stages: list[str]) -> list[StageProgress]:
    """The progress of each of ``stages`` (in that order) under ``output_dir``."""
    out = Path(output_dir)
    result = []
    for name in stages:
        paths = StagePaths(out, name)
        progress = StageProgress(name)
        if paths.is_done():
            try:
                done = paths.read_done()
            except (OSError, ValueError):
                done = {}
            progress.state = DONE
            progress.step = progress.total_steps = int(done.get("steps") or 0)
            progress.loss = done.get("final_loss")
            progress.seconds = float(done.get("seconds") or 0.0)
        elif paths.root.is_dir():
            progress.state = RUNNING
            metrics = _last_metrics(paths.metrics)
            if metrics is not None:
                progress.step = int(metrics["step"])
                progress.total_steps = int(metrics.get("total_steps") or 0)
                loss = metrics.get("loss")
                progress.loss = float(loss) if loss is not None else None
        result.append(progress)
    return result


def progress_events(before: list[StageProgress], after: list[StageProgress]) -> list[tuple[str, dict[str, Any]]]:
    """Events (type, data) that lead from one reading to the next: stage_started, step_progress, stage_finished.

    A stage seen finished without having been seen started gets both events, so watchers always see a stage start
    before it finishes.
    """
    old = {p.name: p for p in before}
    events: list[tuple[str, dict[str, Any]]] = []
    for new in after:
        prev = old.get(new.name, StageProgress(new.name))
        if prev.state == PENDING and new.state != PENDING:
            events.append(("stage_started", {"stage": new.name, "total_steps": new.total_steps}))
        if new.state == RUNNING and new.step > prev.step and new.loss is not None:
            events.append(
                (
                    "step_progress",
                    {"stage": new.name, "step": new.step, "total_steps": new.total_steps, "loss": new.loss},
                )
            )
        if prev.state != DONE and new.state == DONE:
            events.append(
                (
                    "stage_finished",
                    {"stage": new.name, "steps": new.step, "final_loss": new.loss, "seconds": new.seconds},
                )
            )
    return events
