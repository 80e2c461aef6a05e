"""The shipped demo model: the tiny Ola trained by ``ola pipeline run --config workflows/configs/tiny.yaml``.

It lives in ``ola_model/assets/demo-model`` (Ola checkpoint layout with its tokenizer and config, bf16 weights, a
few MB) next to ``TRAINING.md`` and ``eval.json``, which record the command that produced it and its evaluation
report. ``ola generate``, ``ola demo``, the services' embedded default and ``ola eval`` use it when no checkpoint is
given. ``OLA_DEMO_MODEL`` points somewhere else (a freshly trained model, for example).
"""

from __future__ import annotations

import os
from pathlib import Path

DEMO_ENV = "OLA_DEMO_MODEL"
SHIPPED_DEMO = Path(__file__).resolve().parent / "assets" / "demo-model"


def demo_checkpoint_dir() -> Path:
    """The directory of the demo checkpoint (``$OLA_DEMO_MODEL`` or the shipped one).

    Raises:
        FileNotFoundError: the directory or its ``config.json`` is missing; the message says how to build one.
    """
    override = os.environ.get(DEMO_ENV)
    path = Path(override) if override else SHIPPED_DEMO
    if not (path / "config.json").is_file():
        where = f"${DEMO_ENV}={override}" if override else f"the shipped demo model ({path})"
        raise FileNotFoundError(
            f"{where} has no config.json; train one with `ola pipeline run --config workflows/configs/tiny.yaml` "
            f"and point {DEMO_ENV} at its final stage's model directory"
        )
    return path


def has_demo_model() -> bool:
    """Whether :func:`demo_checkpoint_dir` would find a checkpoint."""
    try:
        demo_checkpoint_dir()
    except FileNotFoundError:
        return False
    return True
