"""Checkpoints run as models: a model adapter (``evaluation.models``), ESM calibration capture
(``evaluation.capture``), task-data loading (``evaluation.data``) and evaluators
(``evaluation.evaluators``).

Depends on torch, transformers, fsspec and the ``merging`` library; never on the service,
the workers or the queue. Submodules are imported on use: ``import evaluation`` is light.
"""
