"""``workflows.eval.runner``: per-modality evaluation of a real tiny checkpoint on a small synthesized dataset."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest

from ola_model import save_checkpoint
from ola_model.inference import OlaRequest
from ola_model.prompt import SPEECH_TOKEN_INDEX
from workflows.data import DataFormatError, SynthParams, load_split, synthesize
from workflows.data.world import SPEECH_TASKS, TASKS
from workflows.eval import (
    SYNTH_METRICS,
    EvalError,
    EvalItem,
    PipelinePredictor,
    PredictionError,
    evaluate,
    evaluate_items,
    synth_items,
)

HAVE_ESPEAK = shutil.which("espeak-ng") is not None
# One sample of every task in the test split (two per task: train 1, test 1), none in val. Without espeak-ng the
# speech tasks are left out and their metrics must come back as None.
EVAL_TASKS = [t for t in TASKS if HAVE_ESPEAK or t not in SPEECH_TASKS]
PARAMS = SynthParams(
    seed=11,
    size=2 * len(EVAL_TASKS),
    mix=dict.fromkeys(EVAL_TASKS, 1.0),
    splits={"train": 0.5, "val": 0.0, "test": 0.5},
)
METRIC_TASK = {
    "image_qa_accuracy": "image_qa",
    "ocr_accuracy": "ocr",
    "video_qa_accuracy": "video_qa",
    "video_audio_qa_accuracy": "video_audio_qa",
    "video_audio_qa_accuracy_without_audio": "video_audio_qa",
    "asr_wer": "asr",
    "sound_qa_accuracy": "sound_qa",
    "spoken_image_qa_accuracy": "spoken_image_qa",
    "caption_accuracy": "caption",
    "caption_word_f1": "caption",
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evaldata") / "ds"
    synthesize(out, PARAMS, workers=2, progress=False)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model, tiny_tok) -> Path:
    return save_checkpoint(tiny_model, tmp_path_factory.mktemp("evalckpt") / "tiny", tokenizer=tiny_tok)


@pytest.fixture(scope="module")
def report(dataset: Path, checkpoint: Path):
    """The real model evaluated once for the module (loaded from the checkpoint directory)."""
    return evaluate(checkpoint, dataset, batch_size=4, progress=False)


def oracle(items: Sequence[EvalItem]) -> list[str]:
    return [item.reference for item in items]


def test_report_has_every_metric_with_counts_matching_the_split(dataset: Path, report) -> None:
    manifest = json.loads((dataset / "manifest.json").read_text())
    test_counts = manifest["counts"]["test"]
    assert list(report.metrics)[: len(SYNTH_METRICS)] == list(SYNTH_METRICS)
    for key, task in METRIC_TASK.items():
        assert report.counts[key] == test_counts.get(task, 0), key
        value = report.metrics[key]
        if report.counts[key] == 0:
            assert value is None, key
        elif key == "asr_wer":
            assert value >= 0 and math.isfinite(value)
        else:
            assert 0.0 <= value <= 1.0, key
    # video_audio_qa samples are asked twice (with and without the audio); every other sample once.
    assert len(report.results) == sum(test_counts.values()) + test_counts.get("video_audio_qa", 0)
    assert report.errors == []
    assert all(isinstance(r.prediction, str) for r in report.results)
    assert report.meta["data_manifest_sha256"] == hashlib.sha256((dataset / "manifest.json").read_bytes()).hexdigest()
    assert report.meta["split"] == "test" and report.meta["model"] == "tiny"
    assert report.seconds > 0


def test_report_json_has_metrics_at_the_top_with_counts_and_meta(report) -> None:
    data = json.loads(json.dumps(report.to_json()))
    for key in SYNTH_METRICS:
        assert key in data
        assert data["counts"][key] == report.counts[key]
    assert data["errors"] == []
    assert {"checkpoint", "data_manifest_sha256", "split", "seconds"} <= set(data["meta"])


def test_oracle_predictor_scores_perfect(dataset: Path) -> None:
    result = evaluate(None, dataset, predict=oracle, progress=False)
    measured = {k: v for k, v in result.metrics.items() if result.counts[k]}
    assert measured, "the split has samples"
    for key, value in measured.items():
        assert value == (0.0 if key == "asr_wer" else 1.0), key
    if HAVE_ESPEAK:
        assert result.metrics["asr_wer"] == 0.0 and result.counts["asr_wer"] == 1


def test_wrong_answers_score_zero_and_an_empty_split_reports_none(dataset: Path) -> None:
    wrong = evaluate(None, dataset, predict=lambda items: ["zebra"] * len(items), progress=False)
    for key, value in wrong.metrics.items():
        if wrong.counts[key] and key != "asr_wer":
            assert value == 0.0, key
    if HAVE_ESPEAK:
        assert wrong.metrics["asr_wer"] > 0
    empty = evaluate(None, dataset, split="val", predict=oracle, progress=False)
    assert empty.metrics == dict.fromkeys(SYNTH_METRICS)
    assert set(empty.counts.values()) == {0}
    assert empty.results == []


@pytest.mark.skipif(not HAVE_ESPEAK, reason="video_audio_qa needs espeak-ng")
def test_without_audio_variant_withholds_the_video_audio_track(dataset: Path, tiny_pipeline) -> None:
    seen: list[EvalItem] = []

    def recorder(items: Sequence[EvalItem]) -> list[str]:
        seen.extend(items)
        return oracle(items)

    evaluate(None, dataset, predict=recorder, progress=False)
    vaq = [it for it in seen if it.task == "video_audio_qa"]
    with_audio = [it for it in vaq if "video_audio_qa_accuracy" in it.metrics]
    without = [it for it in vaq if "video_audio_qa_accuracy_without_audio" in it.metrics]
    assert len(with_audio) == len(without) == 1
    loud, muted = with_audio[0], without[0]
    assert loud.request.video == muted.request.video and loud.request.question == muted.request.question
    assert loud.request.use_video_audio and not muted.request.use_video_audio
    # What the model gets: the same frames, but no audio features and no <speech> block in the prompt.
    loud_media, muted_media = tiny_pipeline.load_media(loud.request), tiny_pipeline.load_media(muted.request)
    assert loud_media.audio is not None and muted_media.audio is None
    assert loud_media.video.frames.shape == muted_media.video.frames.shape
    assert SPEECH_TOKEN_INDEX in tiny_pipeline.prompt_ids(loud.request, loud_media)
    assert SPEECH_TOKEN_INDEX not in tiny_pipeline.prompt_ids(muted.request, muted_media)


def test_synth_items_build_each_task_layout(dataset: Path) -> None:
    items = {it.id: it for it in synth_items(load_split(dataset, "test"))}
    for it in items.values():
        req = it.request
        if it.task in ("image_qa", "ocr", "caption"):
            assert len(req.images) == 1 and req.audio is None and req.video is None and req.question
        elif it.task in ("asr", "sound_qa"):
            assert req.audio is not None and not req.images and req.question
        elif it.task == "spoken_image_qa":
            assert req.spoken_question and req.question == "" and len(req.images) == 1 and req.audio is not None
        elif it.task == "video_qa":
            assert req.video is not None and not req.use_video_audio
    assert all("<image>" not in it.request.question and "<speech>" not in it.request.question for it in items.values())


def test_limit_takes_the_first_samples_of_each_task(dataset: Path) -> None:
    big = SynthParams(seed=3, size=6, mix={"image_qa": 1.0, "ocr": 1.0}, splits={"train": 0.0, "val": 0.0, "test": 1})
    root = dataset.parent / "limit"
    synthesize(root, big, workers=2, progress=False)
    full = evaluate(None, root, predict=oracle, progress=False)
    assert full.counts["image_qa_accuracy"] == 3 and full.counts["ocr_accuracy"] == 3
    limited = evaluate(None, root, predict=oracle, limit=2, progress=False)
    assert limited.counts["image_qa_accuracy"] == 2 and limited.counts["ocr_accuracy"] == 2
    assert [r.id for r in limited.results if r.task == "ocr"] == [r.id for r in full.results if r.task == "ocr"][:2]


def test_tasks_keeps_only_the_samples_of_those_tasks(dataset: Path) -> None:
    full = evaluate(None, dataset, predict=oracle, progress=False)
    some = evaluate(None, dataset, predict=oracle, progress=False, tasks=["image_qa", "ocr"])
    assert {r.task for r in some.results} == {"image_qa", "ocr"}
    assert [r.id for r in some.results] == [r.id for r in full.results if r.task in ("image_qa", "ocr")]
    assert some.counts["asr_wer"] == 0 and some.metrics["asr_wer"] is None and some.meta["tasks"] == ["image_qa", "ocr"]
    for bad in (["image"], []):
        with pytest.raises(EvalError, match="not tasks of the data format"):
            evaluate(None, dataset, predict=oracle, progress=False, tasks=bad)


def test_batched_answers_equal_one_by_one(dataset: Path, tiny_pipeline) -> None:
    items = [it for it in synth_items(load_split(dataset, "test")) if it.task in ("image_qa", "ocr")]
    predictor = PipelinePredictor(tiny_pipeline)
    together = evaluate_items(items, predictor, batch_size=8, progress=False)
    alone = evaluate_items(items, predictor, batch_size=1, progress=False)
    assert [r.prediction for r in together.results] == [r.prediction for r in alone.results]
    assert all(r.prediction for r in together.results)


def test_refused_inputs_are_scored_as_empty_answers_and_listed(tmp_path: Path, tiny_pipeline) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    items = [
        EvalItem("bad", "image_qa", OlaRequest("What color?", images=[broken]), "red", {"image_qa_accuracy": "exact"}),
        EvalItem("asr", "asr", OlaRequest("x", audio=broken), "one two three", {"asr_wer": "wer"}),
    ]
    predictions = PipelinePredictor(tiny_pipeline)(items)
    assert all(isinstance(p, PredictionError) and "broken.png" in p.message for p in predictions)
    result = evaluate_items(items, PipelinePredictor(tiny_pipeline), progress=False)
    assert [r.id for r in result.errors] == ["bad", "asr"]
    assert result.metrics["image_qa_accuracy"] == 0.0
    assert result.metrics["asr_wer"] == 1.0  # an unanswered utterance: every reference word deleted
    assert result.to_json()["errors"][0]["id"] == "bad"


def test_bad_arguments_and_inputs_are_clear_errors(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(EvalError, match="batch_size must be an integer >= 1"):
        evaluate(None, dataset, predict=oracle, batch_size=0, progress=False)
    with pytest.raises(EvalError, match="limit must be an integer >= 1"):
        evaluate(None, dataset, predict=oracle, limit=0, progress=False)
    with pytest.raises(DataFormatError, match="unknown split"):
        evaluate(None, dataset, split="dev", predict=oracle, progress=False)
    with pytest.raises(DataFormatError, match=r"no manifest\.json"):
        evaluate(None, tmp_path / "nothing", predict=oracle, progress=False)
    with pytest.raises(EvalError, match="needs a pipeline"):
        evaluate(None, dataset, progress=False)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{ not json")
    with pytest.raises(EvalError, match="cannot be loaded"):
        evaluate(tmp_path / "ckpt", dataset, progress=False)
    with pytest.raises(EvalError, match="no such directory"):
        evaluate(tmp_path / "absent", dataset, progress=False)
    with pytest.raises(EvalError, match="2 answers for 1 items"):
        items = synth_items(load_split(dataset, "test"))[:1]
        evaluate_items(items, lambda batch: ["a"] * (len(batch) + 1), progress=False)
    with pytest.raises(EvalError, match="not one of the options"):
        EvalItem("q", "mc", OlaRequest("?"), "E", {"acc": "choice"}, options={"A": "x", "B": "y"})


@pytest.mark.slow
def test_two_hundred_test_samples_take_well_under_a_minute(tmp_path: Path, tiny_pipeline) -> None:
    root = tmp_path / "big"
    synthesize(root, SynthParams(seed=7, size=200, splits={"train": 0.0, "val": 0.0, "test": 1.0}), progress=False)
    result = evaluate(tiny_pipeline, root, progress=False)
    assert result.meta["num_items"] >= 200
    assert result.seconds < 60, f"{result.seconds:.1f} s for {result.meta['num_items']} items"


def test_the_pipeline_evaluator_scores_a_stage_model(dataset: Path, checkpoint: Path) -> None:
    """``ola pipeline run --eval-data`` builds this evaluator: a stage model in, a JSON report out."""
    from workflows.training.cli import stage_evaluator

    report = stage_evaluator(dataset, split="test", limit=1)("1b", checkpoint)
    assert set(SYNTH_METRICS) <= set(report)  # the metric keys at the top level (None where no sample counts)
    assert report["counts"]["image_qa_accuracy"] == 1
    json.dumps(report)  # logged to MLflow as JSON
