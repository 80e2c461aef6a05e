"""Evaluation: per-modality metrics of a checkpoint on synthetic data (``evaluate``) and on standard benchmarks
stored locally (``evaluate_benchmark``: LibriSpeech, MMBench, Video-MME). The ``ola eval`` command runs both."""

from workflows.eval.benchmarks import BENCHMARKS, evaluate_benchmark
from workflows.eval.errors import BenchmarkFormatError, EvalError
from workflows.eval.runner import (
    SYNTH_METRICS,
    EvalItem,
    EvalReport,
    ItemResult,
    PipelinePredictor,
    PredictionError,
    evaluate,
    evaluate_items,
    synth_items,
)

__all__ = [
    "BENCHMARKS",
    "SYNTH_METRICS",
    "BenchmarkFormatError",
    "EvalError",
    "EvalItem",
    "EvalReport",
    "ItemResult",
    "PipelinePredictor",
    "PredictionError",
    "evaluate",
    "evaluate_benchmark",
    "evaluate_items",
    "synth_items",
]
