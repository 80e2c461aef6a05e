"""The on-disk layout of a stage's run, and the rules that make it resumable.

::

    OUT/stages/<stage>/
        stage.json                 what the stage was started with (a resumed run must match it)
        metrics.jsonl              one line per optimizer step (rank 0)
        steps/step-00000200/       a resumable checkpoint, written in this order:
            ds/                    DeepSpeed engine state: optimizer, scheduler, trainable weights (every rank)
            model/                 the whole model in the Ola checkpoint format (atomic)
            state.json             step, micro-step, elapsed time, loss history
            COMPLETE               written last: only a step directory with it is ever used
        model/                     the stage's output model (Ola format), written when the stage finishes
        DONE.json                  written last: the stage is finished and is never run again

A step directory without ``COMPLETE`` is what an interrupted save leaves behind: it is ignored and removed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
DONE = "DONE.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class StagePaths:
    """Paths of one stage under an output directory."""

    out: Path
    stage: str

    @property
    def root(self) -> Path:
        return self.out / "stages" / self.stage

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def done(self) -> Path:
        return self.root / DONE

    @property
    def steps(self) -> Path:
        return self.root / "steps"

    @property
    def stage_json(self) -> Path:
        return self.root / "stage.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    def step_dir(self, step: int) -> Path:
        return self.steps / f"step-{step:08d}"

    def is_done(self) -> bool:
        return self.done.is_file()

    def read_done(self) -> dict:
        return json.loads(self.done.read_text())


def step_dirs(paths: StagePaths) -> list[tuple[int, Path, bool]]:
    """(step, directory, complete) of every step directory, by step."""
    if not paths.steps.is_dir():
        return []
    found = []
    for d in paths.steps.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d, (d / COMPLETE).is_file()))
    return sorted(found)


def latest_complete(paths: StagePaths) -> tuple[int, Path] | None:
    """The newest step directory with a ``COMPLETE`` marker, or None."""
    complete = [(step, d) for step, d, ok in step_dirs(paths) if ok]
    return complete[-1] if complete else None


def remove_incomplete(paths: StagePaths) -> list[Path]:
    """Delete what an interrupted save leaves: step directories without ``COMPLETE`` and the temporary directory of
    an unfinished atomic model save. Returns the removed paths."""
    removed = []
    for _, d, ok in step_dirs(paths):
        if not ok:
            log.warning("removing half-written checkpoint %s (no %s marker)", d, COMPLETE)
            removed.append(d)
    if paths.root.is_dir():
        removed += sorted(paths.root.glob(f".{paths.model.name}.partial-*"))  # see ola_format.save_checkpoint
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    return removed


def mark_complete(step_dir: Path) -> None:
    """Write the ``COMPLETE`` marker (last, durably)."""
    with open(step_dir / COMPLETE, "w") as fh:
        fh.write("ok\n")
        fh.flush()
        os.fsync(fh.fileno())


def prune(paths: StagePaths, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete step directories."""
    complete = [d for _, d, ok in step_dirs(paths) if ok]
    for d in complete[:-keep_last] if keep_last > 0 else complete:
        shutil.rmtree(d, ignore_errors=True)


class MetricsLog:
    """``metrics.jsonl``: one JSON line per step. Reopening for a resume drops lines past the resumed step."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def __call__(self, metrics: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(metrics, sort_keys=True) + "\n")
