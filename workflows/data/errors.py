"""Errors of the synthetic data workflow. Both are ``OlaError``s, so the ``ola`` CLI prints them and exits with 2."""

from __future__ import annotations

from ola_model.errors import OlaError


class SynthError(OlaError):
    """The generator cannot run (a missing tool, bad parameters) or its output directory is not usable."""


class DataFormatError(OlaError, ValueError):
    """A dataset directory does not follow the ola-synth/1 format: names the file, the field and what was expected."""
