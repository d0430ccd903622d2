"""A succeeded job's reports, written beside its model in the job's storage: ``report.json``
(``report_json``: manifest, timings, coverage, diagnostics, calibration, evaluation) and
``report.html`` (``report_html``: one self-contained page with the plots, when the job has
diagnostics or evaluation)."""
from __future__ import annotations

import time

from merging.spec import MergeSpec
from workers.pipeline import PipelineResult
from workers.report.report_html import render_report_html
from workers.report.report_json import build_report, list_artifacts
from workers.storage import Storage


def write_reports(storage: Storage, job, spec: MergeSpec, run: PipelineResult, started: float) -> list[dict]:
    """Write report.json (and report.html) of a finished run; returns the model's artifacts.
    ``started``: ``time.perf_counter()`` when the job started (the report's ``job_wall``)."""
    result = run.merge
    artifacts = list_artifacts(storage, job.id, result.files)
    report = build_report(job, run, artifacts, {"job_wall": round(time.perf_counter() - started, 3)})
    storage.write_json(job.id, "report.json", report)
    if result.diagnostics is not None or run.evaluation is not None:
        page = dict(result.diagnostics or {"method": spec.method, "experts": spec.expert_names(),
                                           "params": result.manifest.get("params")})
        if run.evaluation is not None:
            page["evaluation"] = run.evaluation
        storage.write_bytes(job.id, "report.html", render_report_html(page).encode())
    return artifacts


__all__ = ["build_report", "list_artifacts", "render_report_html", "write_reports"]
