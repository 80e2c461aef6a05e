"""The workflows' commands for the ``ola`` command line (entry point ``ola.cli``): ``ola data``, ``ola pipeline``."""

from __future__ import annotations


def register(subparsers) -> None:
    from workflows.api.cli import register as register_api
    from workflows.data.cli import register as register_data
    from workflows.eval.cli import register as register_eval
    from workflows.training.cli import register as register_training

    register_data(subparsers)
    register_training(subparsers)
    register_eval(subparsers)
    register_api(subparsers)
