"""Fixtures of the training tests: the smoke dataset, and a torch.distributed group torn down after a module."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """A fresh smoke dataset (``workflows.training.smoke_data``) per test module (a module may define its own)."""
    from workflows.training.smoke_data import write_smoke_dataset

    return write_smoke_dataset(tmp_path_factory.mktemp("smoke"))


@pytest.fixture(scope="module")
def process_group():
    """For modules that run stages in process (``pytestmark = pytest.mark.usefixtures("process_group")``): the gloo
    group they start is shut down at the end of the module."""
    yield
    from workflows.training.stage import shutdown_distributed

    shutdown_distributed()
