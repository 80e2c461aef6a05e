"""Standard benchmarks from local files: LibriSpeech (WER), MMBench and Video-MME (multiple-choice accuracy).

Readers (:mod:`workflows.eval.readers`) give typed samples; this module turns them into :class:`EvalItem` s and runs
them through the same runner as the synthetic evaluation. Metric keys: ``librispeech_wer`` (plus
``librispeech_<subset>_wer`` per subset directory, e.g. ``librispeech_test_clean_wer``), ``mmbench_accuracy``,
``videomme_accuracy`` (plus ``videomme_accuracy_<duration>`` for short / medium / long videos).

MMBench is scored single-pass (one order of the options), not with the official CircularEval, and Video-MME without
subtitles; numbers are comparable between checkpoints evaluated here, not to leaderboard figures.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from pathlib import Path

from ola_model.inference import OlaPipeline, OlaRequest
from ola_model.prompt import ASR_PROMPT
from workflows.eval.errors import EvalError
from workflows.eval.readers import read_librispeech, read_mmbench, read_videomme
from workflows.eval.runner import (
    EvalItem,
    EvalReport,
    PipelinePredictor,
    Predict,
    check_batch_args,
    evaluate_items,
    load_pipeline,
)

log = logging.getLogger(__name__)

BENCHMARKS: tuple[str, ...] = ("librispeech", "mmbench", "videomme")
CHOICE_MAX_NEW_TOKENS = 16
VIDEOMME_DURATIONS = ("short", "medium", "long")


def _key_part(text: str) -> str:
    """A metric key fragment: "test-clean" -> "test_clean"."""
    return re.sub(r"[^0-9a-z]+", "_", text.lower()).strip("_")


def librispeech_items(root: str | Path) -> list[EvalItem]:
    """ASR items (Ola's ASR prompt) of a LibriSpeech directory, scored by corpus WER."""
    items = []
    for s in read_librispeech(root):
        metrics = {"librispeech_wer": "wer"}
        if s.subset:
            metrics[f"librispeech_{_key_part(s.subset)}_wer"] = "wer"
        budget = min(448, 32 + math.ceil(s.seconds * 8))  # speech runs at about 3 words / s, under 3 tokens each
        items.append(
            EvalItem(
                s.id,
                "librispeech",
                OlaRequest(question=ASR_PROMPT, audio=s.audio_path),
                s.transcript,
                metrics,
                max_new_tokens=budget,
            )
        )
    return items


def mmbench_items(path: str | Path) -> list[EvalItem]:
    """Multiple-choice image items of an MMBench TSV, scored by the option letter extracted from the answer."""
    return [
        EvalItem(
            f"mmbench-{s.index}",
            "mmbench",
            OlaRequest(question=s.prompt(), images=[s.image]),
            s.answer,
            {"mmbench_accuracy": "choice"},
            max_new_tokens=CHOICE_MAX_NEW_TOKENS,
            options=dict(s.options),
        )
        for s in read_mmbench(path)
    ]


def videomme_items(
    path: str | Path,
    videos_dir: str | Path | None = None,
    skip_missing: bool = False,
    use_video_audio: bool = False,
    max_video_frames: int | None = None,
) -> list[EvalItem]:
    """Multiple-choice video items of a Video-MME download.

    Args:
        use_video_audio: give the model the video's audio track too (long videos can exceed the audio limit of
            12.5 minutes; such items are reported as errors). Off by default: Video-MME's frames-only setting.
    """
    items = []
    for s in read_videomme(path, videos_dir, skip_missing=skip_missing):
        metrics = {"videomme_accuracy": "choice"}
        if s.duration in VIDEOMME_DURATIONS:
            metrics[f"videomme_accuracy_{s.duration}"] = "choice"
        request = OlaRequest(
            question=s.prompt(),
            video=s.video_path,
            use_video_audio=use_video_audio,
            max_video_frames=max_video_frames,
        )
        items.append(
            EvalItem(
                f"videomme-{s.question_id}",
                "videomme",
                request,
                s.answer,
                metrics,
                max_new_tokens=CHOICE_MAX_NEW_TOKENS,
                options=dict(s.options),
                group=f"videomme/{s.duration or 'all'}",
            )
        )
    return items


def benchmark_items(name: str, path: str | Path, **options) -> list[EvalItem]:
    """Items of benchmark ``name`` (one of :data:`BENCHMARKS`) read from ``path``; ``options`` go to its reader."""
    if name == "librispeech":
        return librispeech_items(path)
    if name == "mmbench":
        return mmbench_items(path)
    if name == "videomme":
        return videomme_items(path, **options)
    raise EvalError(f"unknown benchmark {name!r}; expected one of {list(BENCHMARKS)}")


def _first(items: Iterable[EvalItem], limit: int | None) -> list[EvalItem]:
    items = list(items)
    return items if limit is None else items[:limit]


def evaluate_benchmark(
    pipeline_or_checkpoint: OlaPipeline | str | Path | None,
    name: str,
    path: str | Path,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    predict: Predict | None = None,
    device: str = "cpu",
    **options,
) -> EvalReport:
    """Evaluate a model on a standard benchmark stored locally.

    Args:
        pipeline_or_checkpoint: an :class:`OlaPipeline` or a checkpoint directory (ignored with ``predict``).
        name: "librispeech", "mmbench" or "videomme".
        path: the benchmark's files (see :mod:`workflows.eval.readers`).
        limit: the first ``limit`` questions only.
        options: for videomme: ``videos_dir``, ``skip_missing``, ``use_video_audio``, ``max_video_frames``.

    Raises:
        BenchmarkFormatError: the files are off the benchmark's format.
        EvalError: bad arguments or an unusable checkpoint.
    """
    check_batch_args(batch_size, limit)
    if name != "videomme" and options:
        raise EvalError(f"options {sorted(options)} apply to videomme only, not {name}")
    items = _first(benchmark_items(name, path, **options), limit)
    meta: dict = {"benchmark": name, "bench_path": str(Path(path).resolve()), "limit": limit, "batch_size": batch_size}
    meta["num_items"] = len(items)
    if predict is None:
        if pipeline_or_checkpoint is None:
            raise EvalError("evaluate_benchmark needs a pipeline, a checkpoint directory or a predict function")
        pipeline = load_pipeline(pipeline_or_checkpoint, device=device)
        predict = PipelinePredictor(pipeline)
        meta["model"] = pipeline.config.name
    if isinstance(pipeline_or_checkpoint, (str, Path)):
        meta["checkpoint"] = str(Path(pipeline_or_checkpoint).resolve())
    keys = {"librispeech": ["librispeech_wer"], "mmbench": ["mmbench_accuracy"], "videomme": ["videomme_accuracy"]}
    log.info("evaluating %d %s items from %s", len(items), name, path)
    return evaluate_items(items, predict, batch_size, progress, metric_keys=keys[name], meta=meta)
