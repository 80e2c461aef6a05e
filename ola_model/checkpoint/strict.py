"""Strict assignment of checkpoint tensors to model parameters, shared by every checkpoint family.

Every key is accounted for before any data is read: a checkpoint with missing, unexpected or mis-shaped keys fails
with one :class:`~ola_model.errors.CheckpointError` naming each of them, and the model is left untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ola_model.errors import CheckpointError

log = logging.getLogger(__name__)


@dataclass
class TensorSource:
    """One tensor in a checkpoint: its shape and how to read it into a destination tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    read_into: Callable[[torch.Tensor], None]


@dataclass
class LoadReport:
    """What a load did: how many tensors it loaded and the keys it skipped on purpose (with the reason)."""

    loaded: int = 0
    bytes: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def tensor_source(t: torch.Tensor) -> TensorSource:
    """A source for a tensor already in memory."""
    return TensorSource(tuple(t.shape), t.dtype, lambda out: out.copy_(t))


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every persistent parameter and buffer by its ``state_dict`` name (shared tensors once per name)."""
    return dict(model.state_dict(keep_vars=True))


def check_strict(
    shapes: dict[str, tuple[int, ...]],
    sources: dict[str, TensorSource],
    key_to_param: dict[str, str],
    expected_params: Iterable[str],
    skip: Callable[[str], str | None] = lambda key: None,
    what: str = "checkpoint",
) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Match checkpoint keys to parameters without reading any data.

    Args:
        shapes: internal parameter name -> shape (the destination model's).
        sources: checkpoint key -> tensor source.
        key_to_param: checkpoint key -> internal parameter name (the inverted name map).
        expected_params: internal names this checkpoint must provide (missing ones are an error).
        skip: checkpoint key -> reason when the key is dropped on purpose, else None.
        what: how errors name the checkpoint.
    Returns:
        the (checkpoint key, parameter name) pairs to read, and the skipped keys with their reasons.
    Raises:
        CheckpointError: naming every missing, unexpected and mis-shaped key.
    """
    expected = set(expected_params)
    unmapped = sorted(expected - set(key_to_param.values()))
    if unmapped:
        raise CheckpointError(f"{what}: internal parameters without a checkpoint name: {unmapped}")
    plan: list[tuple[str, str]] = []
    skipped: dict[str, str] = {}
    unexpected, mismatched = [], []
    seen: set[str] = set()
    for key, src in sources.items():
        reason = skip(key)
        if reason is not None:
            skipped[key] = reason
            continue
        name = key_to_param.get(key)
        if name is None or name not in shapes or name not in expected:
            unexpected.append(key)
            continue
        seen.add(name)
        if tuple(shapes[name]) != tuple(src.shape):
            mismatched.append((key, tuple(src.shape), tuple(shapes[name])))
            continue
        plan.append((key, name))
    missing = [key for key, name in key_to_param.items() if name in expected and name not in seen]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{what} does not match the model", missing=missing, unexpected=unexpected, mismatched=mismatched
        )
    return plan, skipped


def read_plan(
    model: nn.Module,
    sources: dict[str, TensorSource],
    plan: list[tuple[str, str]],
    skipped: dict[str, str] | None = None,
    what: str = "checkpoint",
    progress: Callable[[int], None] | None = None,
) -> LoadReport:
    """Read each planned tensor into the model's parameter storage (dtype converted where it differs)."""
    params = named_tensors(model)
    report = LoadReport(skipped=dict(skipped or {}))
    with torch.no_grad():
        for key, name in plan:
            dest = params[name]
            if dest.device.type == "meta":
                raise CheckpointError(f"{what}: destination of {key!r} is on the meta device; call to_empty first")
            sources[key].read_into(dest.data)
            nbytes = dest.numel() * sources[key].dtype.itemsize
            report.loaded += 1
            report.bytes += nbytes
            if progress is not None:
                progress(nbytes)
    return report


def assign_strict(
    model: nn.Module,
    sources: dict[str, TensorSource],
    key_to_param: dict[str, str],
    expected_params: Iterable[str],
    skip: Callable[[str], str | None] = lambda key: None,
    what: str = "checkpoint",
) -> LoadReport:
    """:func:`check_strict` then :func:`read_plan` on an allocated model; nothing is read if any key is wrong."""
    shapes = {name: tuple(t.shape) for name, t in named_tensors(model).items()}
    plan, skipped = check_strict(shapes, sources, key_to_param, expected_params, skip, what)
    return read_plan(model, sources, plan, skipped, what)
