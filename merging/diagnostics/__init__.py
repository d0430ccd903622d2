"""Data-free merge diagnostics: task-vector geometry, spectra, truncation energy,
SAR, STI, rank collapse and an HO-GSVD task-similarity analysis.

Pure library (torch only). ``metrics`` holds the formulas as functions on tensors;
``collector.DiagnosticsCollector`` gathers them while the engine merges (thread-safe, sampled)
and produces one JSON-serialisable report. ``workers.report.report_html`` renders that report.
"""
from merging.diagnostics.collector import DiagnosticsCollector, REPORT_FORMAT
from merging.diagnostics import metrics

__all__ = ["DiagnosticsCollector", "REPORT_FORMAT", "metrics"]
