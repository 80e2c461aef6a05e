"""Which parts of Ola a stage trains, and making sure the others neither change nor cost gradient memory.

:func:`apply_trainable` turns ``requires_grad`` on for the stage's parts and off for the rest, puts frozen parts in
eval mode, and makes frozen parts that nothing trainable feeds (the encoders; a projector whose encoder is frozen
too) run under ``torch.no_grad`` whatever entry point calls them (``encode_images``, ``encode_audio``, a service),
so they build no autograd graph. A frozen LLM still builds a graph: gradients flow through it to the projectors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ola_model.model import PARTS, OlaModel

log = logging.getLogger(__name__)

# What feeds each part. A frozen part whose feeders are all frozen gets no gradient path: it runs without a graph.
UPSTREAM: dict[str, tuple[str, ...]] = {
    "vision_tower": (),
    "whisper": (),
    "beats": (),
    "mm_projector": ("vision_tower",),
    "speech_projector": ("whisper", "beats"),
    "llm": ("vision_tower", "mm_projector", "whisper", "beats", "speech_projector"),
}
_HOOKS_ATTR = "_ola_no_grad_hooks"
# Parameters no stage trains, even when their part trains: Whisper's fixed sinusoidal positions (a buffer in
# openai-whisper) and the BEATs AS2M classifier head, which Ola's features never pass through.
NEVER_TRAINED = ("speech_encoder.whisper_model.embed_positions.", "speech_encoder.beats_model.predictor.")


@dataclass
class Trainability:
    """The outcome of :func:`apply_trainable`."""

    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    no_grad: tuple[str, ...]  # frozen parts that run under torch.no_grad
    trainable_params: dict[str, int]  # per part; 0 for frozen parts
    total_params: dict[str, int]

    @property
    def num_trainable(self) -> int:
        return sum(self.trainable_params.values())

    def summary(self) -> str:
        rows = [
            f"{name:<16} {'train' if name in self.trainable else 'frozen':<6} {self.total_params[name]:>14,d}"
            for name in PARTS
        ]
        return "\n".join([*rows, f"{'trainable':<23} {self.num_trainable:>14,d}"])


def _no_grad_pre_hook(module: nn.Module, args) -> None:
    stack = module.__dict__.setdefault("_ola_grad_stack", [])
    stack.append(torch.is_grad_enabled())
    torch.set_grad_enabled(False)


def _no_grad_post_hook(module: nn.Module, args, output) -> None:
    stack = module.__dict__.get("_ola_grad_stack")
    if stack:
        torch.set_grad_enabled(stack.pop())


def _remove_hooks(model: OlaModel) -> None:
    for handle in model.__dict__.pop(_HOOKS_ATTR, []):
        handle.remove()


def no_grad_parts(trainable: Iterable[str]) -> tuple[str, ...]:
    """Frozen parts with no trainable part upstream: nothing needs their graph."""
    trainable = set(trainable)
    return tuple(name for name in PARTS if name not in trainable and not any(up in trainable for up in UPSTREAM[name]))


def apply_trainable(model: OlaModel, trainable: Iterable[str]) -> Trainability:
    """Apply a stage's trainable parts to ``model`` (in place) and log the parameter counts.

    Args:
        model: the Ola model.
        trainable: part names from :data:`ola_model.model.PARTS`.
    Returns:
        a :class:`Trainability` with the trainable parameter count per part.
    Raises:
        ValueError: an unknown part name.
    """
    trainable = tuple(trainable)
    unknown = [p for p in trainable if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; known parts: {list(PARTS)}")
    parts = model.part_modules()
    _remove_hooks(model)
    model.requires_grad_(False)
    for name in trainable:
        parts[name].requires_grad_(True)
    for pname, param in model.named_parameters():
        if pname.startswith(NEVER_TRAINED):
            param.requires_grad_(False)
    quiet = no_grad_parts(trainable)
    handles = []
    for name in quiet:
        module = parts[name]
        handles.append(module.register_forward_pre_hook(_no_grad_pre_hook))
        # always_call: grad mode is restored even when the forward raises
        handles.append(module.register_forward_hook(_no_grad_post_hook, always_call=True))
    model.__dict__[_HOOKS_ATTR] = handles
    set_train_mode(model, trainable)
    total = model.part_num_params()
    report = Trainability(
        trainable=tuple(p for p in PARTS if p in trainable),
        frozen=tuple(p for p in PARTS if p not in trainable),
        no_grad=quiet,
        trainable_params={name: sum(p.numel() for p in parts[name].parameters() if p.requires_grad) for name in PARTS},
        total_params=total,
    )
    log.info("trainable parts %s, frozen %s:\n%s", list(report.trainable), list(report.frozen), report.summary())
    return report


def set_train_mode(model: OlaModel, trainable: Iterable[str]) -> None:
    """Trainable parts in train mode, frozen parts in eval mode."""
    trainable = set(trainable)
    model.train()
    for name, module in model.part_modules().items():
        module.train(name in trainable)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def parameter_groups(model: OlaModel, weight_decay: float, part_lr: Mapping[str, float] | None = None) -> list[dict]:
    """Optimizer groups over the trainable parameters: weight decay on >= 2-D weights, none on biases and vectors.

    ``part_lr`` gives some parts a learning rate of their own (Ola's ``mm_projector_lr`` / ``mm_vision_tower_lr``
    family): their parameters go in groups that carry an ``lr``; every other group takes the optimizer's. The
    schedule scales each group's own rate.
    """
    part_lr = dict(part_lr or {})
    owner = {id(p): name for name, module in model.part_modules().items() for p in module.parameters()}
    groups: dict[tuple[float | None, bool], dict] = {}
    for _, p in trainable_parameters(model):
        rate = part_lr.get(owner.get(id(p), ""))
        decays = p.dim() >= 2
        group = groups.get((rate, decays))
        if group is None:
            group = {"params": [], "weight_decay": weight_decay if decays else 0.0}
            if rate is not None:
                group["lr"] = rate
            groups[(rate, decays)] = group
        group["params"].append(p)
    return list(groups.values())
