"""Shared fixtures: the tiny preset, built once per session with a fixed seed."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_config():
    from ola_model import OlaConfig

    return OlaConfig.from_name("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    """A seeded random tiny model. Tests must not modify it (use build_model for a private copy)."""
    from ola_model import build_model

    torch.manual_seed(0)
    return build_model(tiny_config, seed=0)


@pytest.fixture(scope="session")
def tiny_tok():
    from ola_model.tokenizer import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model, tiny_tok):
    from ola_model import OlaPipeline

    return OlaPipeline(tiny_model, tiny_tok)
