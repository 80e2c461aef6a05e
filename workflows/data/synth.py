"""Generate a synthetic omni dataset: plan the task mix and splits, build samples in parallel, write the manifest last.

``synthesize(out, SynthParams(seed, size))`` is deterministic: the plan depends only on the parameters, and each
sample only on (seed, index) (see :mod:`workflows.data.tasks`), so the same parameters give byte-identical split JSONs
and media at any number of workers.

The output directory is handled so that nothing half-written is ever taken for a dataset:

- a complete directory (valid manifest) with the same seed, size and params is left alone ("already generated");
- with different parameters it is an error unless ``overwrite``;
- a directory without a manifest (an interrupted run) is cleaned and generated again, provided it holds only files
  this generator writes.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from workflows.data.errors import SynthError
from workflows.data.manifest import (
    MANIFEST,
    SPLIT_FILES,
    dump_json,
    make_manifest,
    read_manifest,
    sha256_file,
    write_atomic,
)
from workflows.data.speech import espeak_version
from workflows.data.tasks import MAX_QA_TURNS, SampleJob, SampleResult, build_sample
from workflows.data.world import DEFAULT_MIX, DEFAULT_SPLITS, SPEECH_TASKS, SPLITS, TASKS

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1.0"  # bump when the same parameters would give different content
OWNED = frozenset({MANIFEST, "media", *SPLIT_FILES.values()})  # what the generator writes in its directory


@dataclass(frozen=True)
class SynthParams:
    """What a dataset is a function of.

    Attributes:
        seed: content seed; different seeds give different samples.
        size: number of samples over all splits.
        mix: task -> weight (normalised here; tasks left out get none).
        splits: split -> fraction, for train, val and test, adding up to 1.
        qa_turns: questions per image-QA sample (a multi-turn conversation about one scene; 1 = a single question).
    """

    seed: int
    size: int
    mix: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    splits: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_SPLITS))
    qa_turns: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or self.seed < 0:
            raise SynthError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.size, int) or self.size < 1:
            raise SynthError(f"size must be a positive integer, got {self.size!r}")
        unknown = sorted(set(self.mix) - set(TASKS))
        if unknown:
            raise SynthError(f"unknown tasks in the mix: {unknown}; expected some of {list(TASKS)}")
        if any(not math.isfinite(w) or w < 0 for w in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise SynthError(f"task weights must be finite, >= 0 and not all 0, got {dict(self.mix)}")
        if (
            isinstance(self.qa_turns, bool)
            or not isinstance(self.qa_turns, int)
            or not 1 <= self.qa_turns <= MAX_QA_TURNS
        ):
            raise SynthError(f"qa_turns must be an integer from 1 to {MAX_QA_TURNS}, got {self.qa_turns!r}")
        if set(self.splits) != set(SPLITS):
            raise SynthError(f"splits must give a fraction for each of {list(SPLITS)}, got {dict(self.splits)}")
        if any(not math.isfinite(f) or f < 0 for f in self.splits.values()):
            raise SynthError(f"split fractions must be finite and >= 0, got {dict(self.splits)}")
        if abs(sum(self.splits.values()) - 1.0) > 1e-6:
            raise SynthError(
                f"split fractions must add up to 1, got {dict(self.splits)} (sum {sum(self.splits.values())})"
            )
        # Canonical forms: task order of TASKS, weights normalised, zero weights dropped; splits in SPLITS order.
        total = sum(self.mix.values())
        object.__setattr__(self, "mix", {t: self.mix[t] / total for t in TASKS if self.mix.get(t, 0) > 0})
        object.__setattr__(self, "splits", {s: float(self.splits[s]) for s in SPLITS})

    def to_json(self) -> dict:
        """The manifest's ``generator.params`` (seed and size live at the manifest's top level)."""
        params = {
            "tasks": {t: round(w, 6) for t, w in self.mix.items()},
            "splits": {s: round(f, 6) for s, f in self.splits.items()},
        }
        if self.qa_turns != 1:  # left out at 1, so datasets made before the option keep their identity
            params["qa_turns"] = self.qa_turns
        return params


@dataclass(frozen=True)
class PlannedSample:
    index: int
    task: str
    split: str


@dataclass
class SynthReport:
    """What :func:`synthesize` did."""

    out: Path
    counts: dict[str, dict[str, int]]
    seconds: float
    skipped: bool  # True: the directory was already complete
    num_files: int = 0


def allocate(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Split ``total`` into integer parts proportional to ``weights`` (largest remainder; ties by key order)."""
    norm = sum(weights.values())
    exact = {k: total * w / norm for k, w in weights.items()}
    parts = {k: math.floor(v) for k, v in exact.items()}
    order = sorted(weights, key=lambda k: -(exact[k] - parts[k]))  # stable: ties keep the mapping's order
    for k in order[: total - sum(parts.values())]:
        parts[k] += 1
    return parts


def split_counts(task_counts: Mapping[str, int], fractions: Mapping[str, float]) -> dict[str, dict[str, int]]:
    """How many samples of each task go to each split.

    Split sizes are ``allocate(size, fractions)``; within the held-out splits (all but the first), each task gets
    about its share (floor of n * fraction, then the remaining places by largest remainder), and the first split
    takes the rest, so every split has about the global task mix.
    """
    splits = list(fractions)
    totals = allocate(sum(task_counts.values()), fractions)
    left = dict(task_counts)
    table = {t: dict.fromkeys(splits, 0) for t in task_counts}
    for split in splits[1:]:
        exact = {t: n * fractions[split] for t, n in task_counts.items()}
        for t in task_counts:
            table[t][split] = min(left[t], math.floor(exact[t]))
        need = totals[split] - sum(table[t][split] for t in task_counts)
        for t in sorted(task_counts, key=lambda t: -(exact[t] - math.floor(exact[t]))) * 2:  # twice: any spare place
            if need <= 0:
                break
            if left[t] > table[t][split]:
                table[t][split] += 1
                need -= 1
        for t in task_counts:
            left[t] -= table[t][split]
    for t in task_counts:
        table[t][splits[0]] = left[t]
    return table


def plan(params: SynthParams) -> list[PlannedSample]:
    """The task and split of every index.

    Task counts follow the mix exactly (largest remainder) and split counts per task follow :func:`split_counts`;
    tasks are placed at seeded random indices, and which samples of a task are held out is seeded too.
    """
    rng = np.random.default_rng(np.random.SeedSequence([params.seed, 0]))  # 0: the plan (samples use 1)
    counts = allocate(params.size, params.mix)
    tasks = [t for t in params.mix for _ in range(counts[t])]
    tasks = [tasks[int(i)] for i in rng.permutation(len(tasks))]
    table = split_counts(counts, params.splits)
    split_of: dict[int, str] = {}
    for task in params.mix:
        indices = [i for i, t in enumerate(tasks) if t == task]
        order = [indices[int(j)] for j in rng.permutation(len(indices))]
        labels = [s for s in reversed(SPLITS) for _ in range(table[task][s])]  # held-out splits first
        split_of.update(zip(order, labels, strict=True))
    return [PlannedSample(i, t, split_of[i]) for i, t in enumerate(tasks)]


def _owned(name: str) -> bool:
    """Whether a top-level entry of a dataset directory is the generator's (its outputs and atomic-write temps)."""
    return name in OWNED or any(name.startswith(f".{n}.") and name.endswith(".tmp") for n in OWNED)


def _prepare_dir(out: Path, params: SynthParams, overwrite: bool) -> bool:
    """Make ``out`` ready to generate into. Returns True when it already holds this exact dataset."""
    manifest = read_manifest(out) if out.is_dir() else None
    if manifest is not None:
        same = (
            manifest["seed"] == params.seed
            and manifest["size"] == params.size
            and manifest["generator"] == {"version": GENERATOR_VERSION, "params": params.to_json()}
        )
        if same:
            return True
        if not overwrite:
            raise SynthError(
                f"{out} already holds a different dataset (seed {manifest['seed']}, size {manifest['size']}, "
                f"generator {manifest['generator']}); asked for seed {params.seed}, size {params.size}, "
                f"generator {{'version': {GENERATOR_VERSION!r}, 'params': {params.to_json()}}}. "
                "Choose another directory or pass --overwrite"
            )
        (out / MANIFEST).unlink()  # from here on the directory is incomplete, whatever happens next
    if out.exists() and not out.is_dir():
        raise SynthError(f"{out} exists and is not a directory")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not _owned(p.name))
        if foreign:
            raise SynthError(
                f"{out} has no manifest (an incomplete dataset) but holds files this generator did not write: "
                f"{foreign[:10]}; choose an empty or new directory"
            )
        leftovers = list(out.iterdir())
        if leftovers:
            logger.info("%s is incomplete (no manifest): removing %d entries and generating again", out, len(leftovers))
        for p in leftovers:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return False


def _run_jobs(jobs: list[SampleJob], workers: int, progress: bool) -> Iterator[SampleResult]:
    """Build every job, in any order, ``workers`` at a time, with a progress bar."""
    if workers <= 1:
        for job in tqdm(jobs, desc="synth", unit="sample", disable=not progress, dynamic_ncols=True):
            yield build_sample(job)
        return
    # forkserver, not fork: workers fork from a clean server process that has imported this module, not from the
    # caller, which may hold threads (gRPC, thread pools) and native state that a forked child cannot use. A fork of
    # a process that had decoded video with PyAV hung in the child: freeing a swscale context there waits on a
    # condition variable of slice threads that only the parent has.
    chunk = max(1, min(16, len(jobs) // (workers * 8)))
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    with ctx.Pool(workers) as pool:
        results = pool.imap_unordered(build_sample, jobs, chunksize=chunk)
        yield from tqdm(results, total=len(jobs), desc="synth", unit="sample", disable=not progress, dynamic_ncols=True)


def synthesize(
    out: str | Path,
    params: SynthParams,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> SynthReport:
    """Generate the dataset ``params`` describes into ``out`` (see the module docstring for reruns).

    Args:
        out: the dataset directory.
        params: seed, size, task mix and split fractions.
        workers: processes building samples (default: the CPUs this process may use). Output does not depend on it.
        overwrite: replace a complete dataset with different parameters.
        progress: show a tqdm progress bar.

    Returns:
        A :class:`SynthReport` with the counts per split and task.

    Raises:
        SynthError: espeak-ng missing (when a speech task is in the mix), a directory that cannot be used, or a
            sample that fails to build (the directory is then left without a manifest).
    """
    out = Path(out)
    start = time.perf_counter()
    if SPEECH_TASKS & set(params.mix):
        logger.info("speech: %s", espeak_version())  # fails, before anything is written, when espeak-ng is missing
    if _prepare_dir(out, params, overwrite):
        manifest = read_manifest(out)
        logger.info("%s: already generated (seed %d, size %d); nothing to do", out, params.seed, params.size)
        return SynthReport(
            out, manifest["counts"], time.perf_counter() - start, skipped=True, num_files=len(manifest["files"])
        )
    workers = max(1, workers or len(os.sched_getaffinity(0)))
    planned = plan(params)
    width = max(6, len(str(params.size - 1)))
    jobs = [SampleJob(p.index, p.task, params.seed, str(out), width, params.qa_turns) for p in planned]
    logger.info("generating %d samples into %s with %d workers", len(jobs), out, workers)
    samples: dict[int, dict] = {}
    files: dict[str, str] = {}
    for result in _run_jobs(jobs, workers, progress):
        samples[result.index] = result.sample
        files.update(result.files)
    counts = {split: dict.fromkeys(params.mix, 0) for split in SPLITS}
    for p in planned:
        counts[p.split][p.task] += 1
    for split, name in SPLIT_FILES.items():
        records = [samples[p.index] for p in planned if p.split == split]
        path = out / name
        write_atomic(path, dump_json(records))
        files[name] = sha256_file(path)
    manifest = make_manifest(params.seed, params.size, counts, files, GENERATOR_VERSION, params.to_json())
    write_atomic(out / MANIFEST, dump_json(manifest))  # last: from now on the directory is complete
    seconds = time.perf_counter() - start
    logger.info("generated %d samples (%d files) in %.1f s", params.size, len(files), seconds)
    return SynthReport(out, counts, seconds, skipped=False, num_files=len(files))
