"""Evaluating a checkpoint: per-modality metrics on an ola-synth/1 split, with batched greedy decoding.

The runner turns samples into :class:`EvalItem` s (a request, a reference and the metrics it counts toward), asks a
*predictor* for answers batch by batch, and scores them. The default predictor (:class:`PipelinePredictor`) prepares
each request with :class:`~ola_model.inference.OlaPipeline` and decodes greedily with the continuous-batching
:class:`~ola_model.engine.LLMEngine`; tests plug in other predictors (an oracle, a recorder) through ``predict``.

A sample whose media the model refuses (corrupt, over a limit) is not dropped: it is scored as an empty answer and
listed in ``EvalReport.errors``.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from ola_model.engine import LLMEngine
from ola_model.errors import InputError, OlaError
from ola_model.generation import SamplingParams
from ola_model.inference import OlaPipeline, OlaRequest
from workflows.data.dataset import load_split
from workflows.data.manifest import MANIFEST, TASK_HEADS
from workflows.data.world import TASKS
from workflows.eval.errors import EvalError
from workflows.eval.metrics import exact_match, extract_choice, wer_from_counts, word_errors, word_f1

log = logging.getLogger(__name__)

ScoreKind = Literal["exact", "choice", "wer", "f1"]
SCORE_KINDS: tuple[str, ...] = ("exact", "choice", "wer", "f1")

# The metrics an ola-synth/1 evaluation always reports (None with count 0 when the split has no such samples).
SYNTH_METRICS: tuple[str, ...] = (
    "image_qa_accuracy",
    "ocr_accuracy",
    "video_qa_accuracy",
    "video_audio_qa_accuracy",
    "video_audio_qa_accuracy_without_audio",
    "asr_wer",
    "sound_qa_accuracy",
    "spoken_image_qa_accuracy",
    "caption_accuracy",
    "caption_word_f1",
)
# Greedy decoding budget per task: answers are a word or two (<= 4 tokens with the tiny BPE), transcripts a short
# sentence (<= 15), captions a phrase (<= 44); a model that does not stop costs the whole budget.
MAX_NEW_TOKENS: dict[str, int] = {
    "image_qa": 10,
    "ocr": 10,
    "sound_qa": 10,
    "video_qa": 10,
    "video_audio_qa": 10,
    "spoken_image_qa": 10,
    "caption": 48,
    "asr": 32,
}


@dataclass
class EvalItem:
    """One question to the model, its reference answer and the metrics it counts toward.

    Attributes:
        id: the sample id (unique within an evaluation, variants get a suffix, e.g. ``vaq-000055/no-audio``).
        task: the task or benchmark name; batches never mix ``group`` s.
        request: what the model is asked (media + question).
        reference: the expected answer (an option letter for ``choice`` metrics).
        metrics: metric key -> how it is scored: ``exact`` (normalised exact match), ``choice`` (the option letter
            extracted from the answer), ``wer`` (corpus word error rate), ``f1`` (mean unigram F1).
        max_new_tokens: greedy decoding budget.
        options: letter -> option text, for ``choice`` metrics.
        group: batching group (defaults to ``task``): similar prompts decode together.
    """

    id: str
    task: str
    request: OlaRequest
    reference: str
    metrics: dict[str, ScoreKind]
    max_new_tokens: int = 16
    options: dict[str, str] = field(default_factory=dict)
    group: str = ""

    def __post_init__(self) -> None:
        if not self.group:
            self.group = self.task
        for key, kind in self.metrics.items():
            if kind not in SCORE_KINDS:
                raise EvalError(f"item {self.id}: metric {key!r} has scoring {kind!r}; expected one of {SCORE_KINDS}")
            if kind == "choice" and self.reference not in self.options:
                raise EvalError(f"item {self.id}: answer {self.reference!r} is not one of the options {self.options}")
        if self.max_new_tokens < 1:
            raise EvalError(f"item {self.id}: max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class PredictionError:
    """A prediction that could not be made (the model refused the input); the item is scored as unanswered."""

    message: str


Prediction = str | PredictionError
Predict = Callable[[Sequence[EvalItem]], Sequence[Prediction]]


@dataclass
class ItemResult:
    """One item's answer and scores (metric key -> 0/1 for exact/choice, the F1, or the utterance's WER)."""

    id: str
    task: str
    prediction: str
    reference: str
    scores: dict[str, float]
    word_edits: tuple[int, int] | None = None  # (edits, reference words) for wer metrics
    error: str | None = None

    def to_json(self) -> dict:
        out = {
            "id": self.id,
            "task": self.task,
            "prediction": self.prediction,
            "reference": self.reference,
            "scores": self.scores,
        }
        if self.word_edits is not None:
            out["word_edits"], out["reference_words"] = self.word_edits
        if self.error is not None:
            out["error"] = self.error
        return out


@dataclass
class EvalReport:
    """Metrics (fractions 0..1, WER >= 0, None when nothing was measured), sample counts, per-item results."""

    metrics: dict[str, float | None]
    counts: dict[str, int]
    results: list[ItemResult]
    seconds: float
    meta: dict = field(default_factory=dict)

    @property
    def errors(self) -> list[ItemResult]:
        return [r for r in self.results if r.error is not None]

    def __getitem__(self, key: str) -> float | None:
        return self.metrics[key]

    def to_json(self) -> dict:
        """The metric keys at the top level, then ``counts``, ``errors`` (id + message) and ``meta``."""
        return {
            **self.metrics,
            "counts": dict(self.counts),
            "errors": [{"id": r.id, "error": r.error} for r in self.errors],
            "meta": {**self.meta, "seconds": round(self.seconds, 3)},
        }


# -------------------------------------------------------------------------------------------------- predictors
class PipelinePredictor:
    """Answers with an :class:`OlaPipeline`: each batch prepared, then greedy decoding on an :class:`LLMEngine`.

    Requests whose media the model refuses (:class:`~ola_model.errors.InputError`: corrupt media, over a limit) give
    a :class:`PredictionError` instead of stopping the evaluation.
    """

    def __init__(self, pipeline: OlaPipeline) -> None:
        self.pipeline = pipeline

    def __call__(self, items: Sequence[EvalItem]) -> list[Prediction]:
        pipe = self.pipeline
        engine = LLMEngine(pipe.model, pipe.stop_ids, max_batch=max(1, len(items)))
        out: list[Prediction | None] = [None] * len(items)
        tokens: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            try:
                prompt = pipe.prepare(item.request, reserve=item.max_new_tokens)
                engine.add(str(i), prompt.embeds, SamplingParams.greedy(item.max_new_tokens))
            except InputError as exc:
                log.warning("%s: %s", item.id, exc)
                out[i] = PredictionError(str(exc))
                continue
            tokens[str(i)] = []
        while engine.has_work():
            for step in engine.step():
                if step.token_id is not None:
                    tokens[step.request_id].append(step.token_id)
        for rid, ids in tokens.items():
            out[int(rid)] = pipe.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return [p if p is not None else PredictionError("no prediction") for p in out]


def load_pipeline(pipeline_or_checkpoint: OlaPipeline | str | Path, device: str = "cpu") -> OlaPipeline:
    """The pipeline itself, or one loaded from a checkpoint directory.

    Raises:
        EvalError: the directory is missing or its checkpoint cannot be loaded (the cause is in the message).
    """
    if isinstance(pipeline_or_checkpoint, OlaPipeline):
        return pipeline_or_checkpoint
    path = Path(pipeline_or_checkpoint)
    if not path.is_dir():
        raise EvalError(f"checkpoint {path}: no such directory")
    try:
        return OlaPipeline.from_checkpoint(path, device=device)
    except (OlaError, OSError, ValueError, KeyError) as exc:
        raise EvalError(f"checkpoint {path} cannot be loaded: {type(exc).__name__}: {exc}") from exc


# ----------------------------------------------------------------------------------------------- synth items
def synth_items(records: Iterable[dict], max_video_frames: int | None = None) -> list[EvalItem]:
    """Evaluation items of ola-synth/1 records (as :func:`workflows.data.load_split` returns them).

    A ``video_audio_qa`` record gives two items: one with the video's audio track, and one with it withheld
    (``use_video_audio=False``; the prompt is then the video-only layout ``<image>\\n{q}``), which measures how much
    the answer depends on hearing the narration.
    """
    items: list[EvalItem] = []
    for rec in records:
        task, sid = rec["task"], rec["id"]
        human, answer = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
        question = human[len(TASK_HEADS[task]) :]
        budget = MAX_NEW_TOKENS[task]
        if task in ("image_qa", "ocr", "caption"):
            request = OlaRequest(question=question, images=[rec["image"]])
        elif task in ("asr", "sound_qa"):
            request = OlaRequest(question=question, audio=rec["audio"])
        elif task == "spoken_image_qa":
            request = OlaRequest(question="", images=[rec["image"]], audio=rec["audio_q"], spoken_question=True)
        elif task in ("video_qa", "video_audio_qa"):
            request = OlaRequest(
                question=question,
                video=rec["video"],
                use_video_audio=task == "video_audio_qa",
                max_video_frames=max_video_frames,
            )
        else:
            raise EvalError(f"{sid}: unknown task {task!r}; expected one of {list(TASKS)}")
        if task == "asr":
            metrics: dict[str, ScoreKind] = {"asr_wer": "wer"}
        elif task == "caption":
            metrics = {"caption_accuracy": "exact", "caption_word_f1": "f1"}
        else:
            metrics = {f"{task}_accuracy": "exact"}
        items.append(EvalItem(sid, task, request, answer, metrics, max_new_tokens=budget))
        if task == "video_audio_qa":
            muted = OlaRequest(
                question=question, video=rec["video"], use_video_audio=False, max_video_frames=max_video_frames
            )
            items.append(
                EvalItem(
                    f"{sid}/no-audio",
                    task,
                    muted,
                    answer,
                    {"video_audio_qa_accuracy_without_audio": "exact"},
                    max_new_tokens=budget,
                    group="video_audio_qa/no-audio",
                )
            )
    return items


def limit_per_task(records: Sequence[dict], limit: int | None) -> list[dict]:
    """The first ``limit`` records of each task, in their order (all when ``limit`` is None)."""
    if limit is None:
        return list(records)
    seen: dict[str, int] = {}
    out = []
    for rec in records:
        n = seen.get(rec["task"], 0)
        if n < limit:
            out.append(rec)
            seen[rec["task"]] = n + 1
    return out


# ---------------------------------------------------------------------------------------------------- scoring
def _score(item: EvalItem, prediction: str) -> tuple[dict[str, float], tuple[int, int] | None]:
    scores: dict[str, float] = {}
    edits = None
    for key, kind in item.metrics.items():
        if kind == "exact":
            scores[key] = float(exact_match(prediction, item.reference))
        elif kind == "choice":
            scores[key] = float(extract_choice(prediction, item.options) == item.reference)
        elif kind == "f1":
            scores[key] = word_f1(prediction, item.reference)
        else:
            edits = word_errors(item.reference, prediction)
            scores[key] = edits[0] / edits[1] if edits[1] else float(edits[0] > 0)
    return scores, edits


def aggregate(
    items: Sequence[EvalItem], results: Sequence[ItemResult], keys: Sequence[str] = ()
) -> tuple[dict[str, float | None], dict[str, int]]:
    """Metric values and counts over scored items: means, and for ``wer`` total edits / total reference words.

    Every key of ``keys`` is present, as None with count 0 when no item counts toward it.
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    wer_counts: dict[str, list[int]] = {}
    kinds: dict[str, str] = {}
    for item, res in zip(items, results, strict=True):
        for key, kind in item.metrics.items():
            if kinds.setdefault(key, kind) != kind:
                raise EvalError(f"metric {key!r} is scored as both {kinds[key]!r} and {kind!r}")
            counts[key] = counts.get(key, 0) + 1
            if kind == "wer":
                acc = wer_counts.setdefault(key, [0, 0])
                acc[0] += res.word_edits[0]
                acc[1] += res.word_edits[1]
            else:
                sums[key] = sums.get(key, 0.0) + res.scores[key]
    ordered = list(dict.fromkeys([*keys, *counts]))
    metrics: dict[str, float | None] = {}
    for key in ordered:
        if counts.get(key, 0) == 0:
            metrics[key] = None
        elif kinds[key] == "wer":
            metrics[key] = wer_from_counts(*wer_counts[key])
        else:
            metrics[key] = sums[key] / counts[key]
    return metrics, {key: counts.get(key, 0) for key in ordered}


def _batches(items: Sequence[EvalItem], batch_size: int) -> Iterable[list[int]]:
    """Indices of ``items`` in batches of at most ``batch_size`` from one group, groups in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item.group, []).append(i)
    for idx in groups.values():
        for start in range(0, len(idx), batch_size):
            yield idx[start : start + batch_size]


def check_batch_args(batch_size: int, limit: int | None) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EvalError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise EvalError(f"limit must be an integer >= 1 (or None for all samples), got {limit!r}")


def evaluate_items(
    items: Sequence[EvalItem],
    predict: Predict,
    batch_size: int = 8,
    progress: bool = True,
    metric_keys: Sequence[str] = (),
    meta: dict | None = None,
) -> EvalReport:
    """Answer and score ``items``.

    Args:
        items: what to ask.
        predict: answers a batch of items (same length, in order); a :class:`PredictionError` marks a refused one.
        batch_size: items per ``predict`` call (one group per batch).
        progress: a tqdm bar on stderr.
        metric_keys: metrics to report even when no item counts toward them (as None, count 0).
        meta: copied into the report.
    """
    check_batch_args(batch_size, None)
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise EvalError("item ids must be unique within an evaluation")
    start = time.perf_counter()
    results: list[ItemResult | None] = [None] * len(items)
    with tqdm(
        total=len(items), desc="eval", unit="sample", disable=not progress, file=sys.stderr, dynamic_ncols=True
    ) as bar:
        for batch in _batches(items, batch_size):
            bar.set_postfix_str(items[batch[0]].group, refresh=False)
            preds = list(predict([items[i] for i in batch]))
            if len(preds) != len(batch):
                raise EvalError(f"predict returned {len(preds)} answers for {len(batch)} items")
            for i, pred in zip(batch, preds, strict=True):
                item = items[i]
                error = pred.message if isinstance(pred, PredictionError) else None
                text = "" if error is not None else str(pred)
                scores, edits = _score(item, text)
                results[i] = ItemResult(item.id, item.task, text, item.reference, scores, edits, error)
            bar.update(len(batch))
    done = [r for r in results if r is not None]
    metrics, counts = aggregate(items, done, metric_keys)
    seconds = time.perf_counter() - start
    report = EvalReport(metrics, counts, done, seconds, dict(meta or {}))
    for key, value in metrics.items():
        log.info("%s = %s (n=%d)", key, "n/a" if value is None else f"{value:.4f}", counts[key])
    if report.errors:
        log.warning("%d of %d items could not be answered (scored as empty answers)", len(report.errors), len(items))
    return report


def manifest_sha256(data_dir: str | Path) -> str:
    """sha256 of a dataset's ``manifest.json`` (which hashes every file): identifies the exact data evaluated."""
    return hashlib.sha256((Path(data_dir) / MANIFEST).read_bytes()).hexdigest()


def evaluate(
    pipeline_or_checkpoint: OlaPipeline | str | Path | None,
    data_dir: str | Path,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    predict: Predict | None = None,
    max_video_frames: int | None = None,
    device: str = "cpu",
    tasks: Sequence[str] | None = None,
) -> EvalReport:
    """Per-modality metrics of a model on one split of an ola-synth/1 dataset.

    Args:
        pipeline_or_checkpoint: an :class:`OlaPipeline` or a checkpoint directory (ignored when ``predict`` is given).
        data_dir: the dataset directory (``ola data synth --out``).
        split: "train", "val" or "test".
        limit: at most this many samples of each task (None: all).
        batch_size: requests decoded together.
        progress: a tqdm bar on stderr.
        predict: answers batches of :class:`EvalItem` instead of the model (a seam for tests and other backends).
        max_video_frames: frames sampled per video (None: the model's limit).
        device: where a checkpoint is loaded.
        tasks: only the samples of these tasks (None: every task).

    Returns:
        An :class:`EvalReport` with the keys of :data:`SYNTH_METRICS` (None with count 0 for a task the split lacks
        or leaves out).

    Raises:
        DataFormatError: the dataset is missing, incomplete or off the format, or the split is unknown.
        EvalError: bad arguments, or the checkpoint cannot be loaded.
    """
    check_batch_args(batch_size, limit)
    records = load_split(data_dir, split)
    if tasks is not None:
        unknown = sorted(set(tasks) - set(TASKS))
        if unknown or not tasks:
            raise EvalError(f"tasks {unknown or list(tasks)}: not tasks of the data format (known: {', '.join(TASKS)})")
        wanted = set(tasks)
        records = [r for r in records if r["task"] in wanted]
    records = limit_per_task(records, limit)
    items = synth_items(records, max_video_frames=max_video_frames)
    meta: dict = {
        "data": str(Path(data_dir).resolve()),
        "data_manifest_sha256": manifest_sha256(data_dir),
        "split": split,
        "limit": limit,
        "tasks": list(tasks) if tasks is not None else None,
        "batch_size": batch_size,
        "num_items": len(items),
    }
    if predict is None:
        if pipeline_or_checkpoint is None:
            raise EvalError("evaluate needs a pipeline, a checkpoint directory or a predict function")
        pipeline = load_pipeline(pipeline_or_checkpoint, device=device)
        predict = PipelinePredictor(pipeline)
        meta["model"] = pipeline.config.name
    if isinstance(pipeline_or_checkpoint, (str, Path)):
        meta["checkpoint"] = str(Path(pipeline_or_checkpoint).resolve())
    log.info("evaluating %d items of %s (%s)", len(items), data_dir, split)
    return evaluate_items(items, predict, batch_size, progress, metric_keys=SYNTH_METRICS, meta=meta)
