"""Merge-quality benchmark: 8 MiniLM experts fine-tuned on real text tasks, every merge
method run through the job API, and the papers' table written to bench/QUALITY.md.

``python -m bench.quality.run`` (``make bench-quality``) runs it end to end:

* ``tasks``: load ``shared/benchmark/text-tasks/*.json``, carve a seeded validation split out of
  train, write JSONL splits and unlabeled calibration samples;
* ``finetune``: the CLIP-style task-arithmetic recipe (frozen prompt head, 30 · cos logits, mean
  pooling, embedding tables frozen), experts cached by a hash of recipe + data + base;
* ``run``: start ``submerge serve`` in embedded mode, submit one job per method × α × T over HTTP,
  collect the reports into ``bench/quality/results/``;
* ``report``: ``bench/QUALITY.md`` and the plot from those results.
"""
