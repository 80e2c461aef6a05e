"""Trainability per stage: requires_grad, eval mode and graph-free frozen encoders; a training step changes only
the trainable parts, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ola_model import build_model
from ola_model.model import PARTS
from workflows.training.batch import StageDataset, build_inputs, collate, lm_loss
from workflows.training.config import load_config
from workflows.training.smoke_data import write_smoke_dataset
from workflows.training.trainability import NEVER_TRAINED, apply_trainable, no_grad_parts, parameter_groups

TINY = load_config(Path(__file__).resolve().parents[2] / "workflows" / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def mixed_batch(tmp_path_factory, tiny_tok, tiny_config):
    """One batch with an image and a video with its audio: every part of the model is used."""
    root = write_smoke_dataset(tmp_path_factory.mktemp("smoke"))
    mix = {"image_qa": 1.0, "video_audio_qa": 1.0}
    ds = StageDataset(root, mix, tiny_tok, tiny_config, max_video_frames=4)
    picks = [next(i for i, s in enumerate(ds.specs) if s.task == t) for t in mix]
    return collate([ds[i] for i in picks])


def test_no_grad_parts_follow_the_data_flow(tiny_config) -> None:
    assert no_grad_parts(["mm_projector"]) == ("vision_tower", "whisper", "beats", "speech_projector")
    assert no_grad_parts(["vision_tower", "mm_projector", "llm"]) == ("whisper", "beats", "speech_projector")
    assert no_grad_parts(["speech_projector"]) == ("vision_tower", "mm_projector", "whisper", "beats")
    assert no_grad_parts(PARTS) == ()
    with pytest.raises(ValueError, match="unknown part"):
        apply_trainable(build_model(tiny_config, seed=0), ["mm_projector", "ears"])


@pytest.mark.parametrize("stage", [s.name for s in TINY.stages])
def test_a_step_changes_exactly_the_trainable_parts(stage: str, tiny_config, mixed_batch) -> None:
    trainable = TINY.stage(stage).trainable
    model = build_model(tiny_config, seed=0)
    report = apply_trainable(model, trainable)
    parts = model.part_modules()
    for name, module in parts.items():
        assert module.training == (name in trainable), name
        expected = sum(p.numel() for n, p in module.named_parameters() if name in trainable)
        assert report.trainable_params[name] <= expected
        assert (report.trainable_params[name] > 0) == (name in trainable)

    # frozen parts that nothing trainable feeds run without a graph, whoever calls them
    outputs: dict[str, bool] = {}
    hooks = [
        parts[name].register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, _requires_grad(out)))
        for name in ("vision_tower", "whisper", "beats")
    ]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(parameter_groups(model, weight_decay=0.01), lr=1e-2)
    inputs = build_inputs(model, mixed_batch, 4096, trainable)
    loss, _ = lm_loss(model, inputs)
    loss.backward()
    optimizer.step()
    for h in hooks:
        h.remove()
    for name in ("vision_tower", "whisper", "beats"):
        assert outputs[name] == (name in trainable), (name, outputs)
    assert torch.is_grad_enabled()

    for pname, param in model.named_parameters():
        part = next(n for n, m in parts.items() if any(q is param for q in m.parameters()))
        if part in trainable and not pname.startswith(NEVER_TRAINED):
            assert param.grad is not None and not torch.equal(param, before[pname]), pname
        else:
            assert param.grad is None and torch.equal(param, before[pname]), pname


def _requires_grad(out) -> bool:
    tensor = out if isinstance(out, torch.Tensor) else out[0]
    return bool(tensor.requires_grad)


def test_reapplying_replaces_the_hooks(tiny_config) -> None:
    model = build_model(tiny_config, seed=0)
    apply_trainable(model, ["mm_projector"])
    apply_trainable(model, ["vision_tower", "mm_projector"])
    view = torch.zeros(3, 32, 32)
    feats = model.vision_tower([view])[0]
    assert feats.requires_grad  # the vision tower trains now: its old no-grad hook is gone
