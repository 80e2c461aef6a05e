"""One stage on a DeepSpeed engine in this process: it learns, it checkpoints, it resumes exactly, it is not redone,
ZeRO-3 works, and frozen parts come out bit for bit unchanged."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from ola_model.checkpoint.ola_format import load_checkpoint
from workflows.training.checkpoints import COMPLETE, StagePaths
from workflows.training.config import config_from_dict
from workflows.training.stage import (
    StageError,
    deepspeed_config,
    lr_factor,
    run_stage,
    total_steps,
)

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


pytestmark = pytest.mark.usefixtures("process_group")


def make_config(data_root: Path, **stage) -> object:
    base = {
        "name": "s",
        "trainable": ["mm_projector", "llm"],
        "data": {"caption": 1.0, "image_qa": 1.0},
        "steps": 4,
        "batch_size": 2,
        "lr": 1e-3,
        "warmup_ratio": 0.0,
        "save_every": 2,
        "max_length": 2048,
        "max_video_frames": 4,
    }
    return config_from_dict(
        {"name": "test", "model": {"preset": "tiny"}, "data": {"root": str(data_root)}, "stages": [{**base, **stage}]}
    )


def _record():
    seen: list[dict] = []
    return seen, seen.append


def test_lr_schedule_is_linear_warmup_then_cosine() -> None:
    assert [lr_factor(s, total=10, warmup=2) for s in (0, 1, 2)] == [0.0, 0.5, 1.0]
    assert lr_factor(6, total=10, warmup=2) == pytest.approx(0.5)
    assert lr_factor(10, total=10, warmup=2) == pytest.approx(0.0)
    assert lr_factor(10, total=10, warmup=2, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(7, total=10, warmup=2, schedule="constant") == 1.0


def test_epochs_become_steps(data_root) -> None:
    config = make_config(data_root, steps=None, epochs=2.5, grad_accum=2)
    assert total_steps(config.stages[0], batches_per_epoch=8) == 10  # 2.5 epochs x 8 micro-batches / 2


def test_deepspeed_config_follows_the_stage(data_root) -> None:
    stage = make_config(data_root, zero_stage=3, grad_accum=4, grad_clip=0.5).stages[0]
    ds = deepspeed_config(stage, world_size=8, precision="bf16", on_gpu=True)
    assert ds["train_batch_size"] == 2 * 4 * 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "torch_adam": True},
    }


def test_zero2_overfits_a_repeated_batch_and_freezes_the_rest(data_root, tmp_path) -> None:
    # one OCR sample, twice per batch: the tiny model learns its answer
    config = make_config(data_root, data={"ocr": 2.0}, steps=12, lr=3e-3, schedule="constant", save_every=100)
    seen, record = _record()
    result = run_stage(config, "s", tmp_path, callbacks=[record], progress=False)
    losses = [m["loss"] for m in seen]
    assert [m["step"] for m in seen] == list(range(1, 13))
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(m["samples_per_s"] > 0 and m["lr"] == pytest.approx(3e-3) for m in seen)
    done = result.done
    assert result.finished and done["steps"] == 12 and done["zero_stage"] == 2 and done["precision"] == "fp32"
    assert done["final_loss"] == pytest.approx(losses[-1])
    assert [json.loads(line)["step"] for line in StagePaths(tmp_path, "s").metrics.read_text().splitlines()] == list(
        range(1, 13)
    )
    assert not StagePaths(tmp_path, "s").steps.exists()  # step checkpoints go once the stage is done

    # frozen parts are bitwise unchanged, trainable ones changed (the stage started from the seeded preset)
    from ola_model import OlaConfig, build_model

    start = build_model(OlaConfig.from_name("tiny"), seed=0)
    trained = load_checkpoint(result.model_dir)
    for part, module in trained.part_modules().items():
        changed = any(
            not torch.equal(a, b)
            for a, b in zip(module.parameters(), start.part_modules()[part].parameters(), strict=True)
        )
        assert changed == (part in ("mm_projector", "llm")), part

    # a finished stage is not run again
    seen_again, record_again = _record()
    again = run_stage(config, "s", tmp_path, callbacks=[record_again], progress=False)
    assert again.skipped and not seen_again and again.done == done


def test_part_lr_gives_a_part_its_own_rate(data_root, tmp_path) -> None:
    # the LLM at a rate too small to move it measurably, the projector at a real one
    config = make_config(
        data_root, steps=2, lr=1e-30, part_lr={"mm_projector": 1e-2}, schedule="constant", save_every=100
    )
    seen, record = _record()
    result = run_stage(config, "s", tmp_path, callbacks=[record], progress=False)
    assert [m["lr"] for m in seen] == [pytest.approx(1e-30)] * 2  # the stage's base rate is what is logged
    from ola_model import OlaConfig, build_model

    start = build_model(OlaConfig.from_name("tiny"), seed=0).part_modules()
    trained = load_checkpoint(result.model_dir).part_modules()

    def moved(part: str) -> float:
        pairs = zip(trained[part].parameters(), start[part].parameters(), strict=True)
        return max(float((a - b).abs().max()) for a, b in pairs)

    assert moved("llm") < 1e-20  # about two steps of 1e-30 (Adam steps are about lr)
    assert moved("mm_projector") > 1e-3


def test_an_interrupted_stage_resumes_exactly(data_root, tmp_path) -> None:
    config = make_config(data_root)
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full, record_full = _record()
    reference = run_stage(config, "s", full_dir, callbacks=[record_full], progress=False)

    first, record_first = _record()
    stopped = run_stage(config, "s", cut_dir, max_steps=3, callbacks=[record_first], progress=False)
    paths = StagePaths(cut_dir, "s")
    assert not stopped.finished and not paths.is_done() and [m["step"] for m in first] == [1, 2, 3]
    assert (paths.step_dir(2) / COMPLETE).is_file() and not paths.model.exists()
    # a save interrupted at step 4 leaves a directory without COMPLETE: it must be ignored and removed
    half = paths.step_dir(4)
    (half / "model").mkdir(parents=True)
    (half / "state.json").write_text("{ not json")
    partial = paths.root / ".model.partial-x1"  # a final-model save killed half-way
    partial.mkdir()

    rest, record_rest = _record()
    resumed = run_stage(config, "s", cut_dir, callbacks=[record_rest], progress=False)
    assert [m["step"] for m in rest] == [3, 4]  # resumed after step 2, the last complete checkpoint
    assert resumed.done["resumed_from_step"] == 2 and resumed.finished
    assert not half.exists() and not partial.exists()
    # same data order and the same optimizer state: the same losses and the same final weights
    assert [m["loss"] for m in rest] == pytest.approx([m["loss"] for m in full[2:]], rel=1e-5)
    assert [m["lr"] for m in rest] == pytest.approx([m["lr"] for m in full[2:]])  # the scheduler's state too
    a, b = load_checkpoint(reference.model_dir).state_dict(), load_checkpoint(resumed.model_dir).state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    lines = [json.loads(line)["step"] for line in paths.metrics.read_text().splitlines()]
    assert lines == [1, 2, 3, 4]  # step 3 of the interrupted run was dropped from the log

    changed = make_config(data_root, lr=5e-4)
    (cut_dir / "stages" / "s" / "DONE.json").unlink()
    with pytest.raises(StageError, match=r"different settings \(\['stage'\]\)"):
        run_stage(changed, "s", cut_dir, progress=False)


def test_zero3_trains_in_process(data_root, tmp_path) -> None:
    config = make_config(
        data_root,
        trainable=["mm_projector", "speech_projector", "llm"],
        data={"caption": 1.0, "asr": 1.0},
        steps=3,
        grad_accum=2,
        zero_stage=3,
        zero3_param_persistence_threshold=1000,  # partition the matrices, keep the vectors whole
    )
    seen, record = _record()
    result = run_stage(config, "s", tmp_path, callbacks=[record], progress=False)
    assert result.finished and result.done["zero_stage"] == 3 and result.done["samples"] == 3 * 2 * 2
    assert all(math.isfinite(m["loss"]) for m in seen) and len(seen) == 3
    model = load_checkpoint(result.model_dir)  # the gathered, full-size weights
    assert model.llm.model.embed_tokens.weight.shape == (1024, 64)
