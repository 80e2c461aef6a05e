"""Stage training of Ola (progressive modality alignment) with DeepSpeed, in-process or on Ray Train.

- :mod:`~workflows.training.config`: the YAML schema (``workflows/configs/*.yaml``).
- :mod:`~workflows.training.trainability`: which parts train; frozen parts unchanged and graph-free.
- :mod:`~workflows.training.batch`: tokenization with labels, media preprocessing, length-grouped batches, splicing
  of encoder blocks, the loss.
- :mod:`~workflows.training.stage`: one stage on a DeepSpeed engine, resumable checkpoints.
- :mod:`~workflows.training.pipeline`: the stages in order; :mod:`~workflows.training.cli`: ``ola pipeline run``.
- :mod:`~workflows.training.smoke_data`: a 13-sample dataset of every task, for tests and smoke runs.

Command line::

    ola pipeline run --config workflows/configs/tiny.yaml [--out DIR] [--workers N] [--stages 1a,1b]
                     [--data-root DIR] [--ray] [--device auto|cpu|cuda] [--no-progress]
"""
