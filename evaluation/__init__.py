"""The task pool: checkpoints run as models on evaluation tasks. Model adapters
(``evaluation.models``), task-data loading (``evaluation.data``), evaluators behind a registry
(``evaluation.evaluators``), scoring with cached baselines (``evaluation.scoring``) and ESM
calibration capture (``evaluation.capture``).

Depends on torch, transformers, fsspec and the ``merging`` library; never on the service,
the workers or the queue (the import contract in pyproject.toml checks it). Submodules are
imported on use: ``import evaluation`` is light.
"""
