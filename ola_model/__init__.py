"""Ola: a faithful, checkpoint-compatible implementation of the omni-modal Ola model, in plain PyTorch.

Public API::

    from ola_model import OlaConfig, build_model, load_checkpoint, save_checkpoint
    model = build_model(OlaConfig.from_name("tiny"), seed=0)
    shapes = expected_checkpoint_shapes(OlaConfig.from_name("ola-7b"))
    image_num_tokens(1000, 750)  # 935 LLM positions

This package imports no serving or MLOps library (gRPC, Ray, MLflow, DeepSpeed, Redis, Kubernetes).
"""

from ola_model.checkpoint.ola_format import expected_checkpoint_shapes, load_checkpoint, save_checkpoint
from ola_model.config import OlaConfig
from ola_model.errors import CheckpointError, InputError, LimitError, MediaError, OlaError
from ola_model.generation import SamplingParams
from ola_model.inference import OlaPipeline, OlaRequest
from ola_model.model import OlaModel, build_model
from ola_model.tokens import audio_num_tokens, image_num_tokens, video_num_tokens

__all__ = [
    "CheckpointError",
    "InputError",
    "LimitError",
    "MediaError",
    "OlaConfig",
    "OlaError",
    "OlaModel",
    "OlaPipeline",
    "OlaRequest",
    "SamplingParams",
    "audio_num_tokens",
    "build_model",
    "expected_checkpoint_shapes",
    "image_num_tokens",
    "load_checkpoint",
    "save_checkpoint",
    "video_num_tokens",
]
