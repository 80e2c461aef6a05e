"""Synthetic omni data: a small world of shapes, words, speech, sounds and videos in the ola-synth/1 format.

``synthesize`` writes a dataset (``ola data synth``); ``load_split`` / ``verify`` read and check one. The format is
documented in ``docs/data-format.md``.
"""

from workflows.data.dataset import VerifyReport, load_split, verify
from workflows.data.errors import DataFormatError, SynthError
from workflows.data.synth import SynthParams, SynthReport, synthesize

__all__ = [
    "DataFormatError",
    "SynthError",
    "SynthParams",
    "SynthReport",
    "VerifyReport",
    "load_split",
    "synthesize",
    "verify",
]
