"""Errors of the evaluation workflow. Both are ``OlaError``s, so the ``ola`` CLI prints them and exits with 2."""

from __future__ import annotations

from ola_model.errors import OlaError


class EvalError(OlaError, ValueError):
    """Evaluation cannot run as asked: a bad argument (named, with its limit), no model, an unusable checkpoint."""


class BenchmarkFormatError(OlaError, ValueError):
    """Benchmark files do not follow their standard layout: names the file, the row or field, and what was expected."""
