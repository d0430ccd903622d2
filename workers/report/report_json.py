"""``report.json``: a succeeded job's report, built from the merge's manifest and the pipeline's
results (``build_report``), and the list of the model's files in the job's storage
(``list_artifacts``), which the job's result carries too."""
from __future__ import annotations

import hashlib
from typing import Any

from workers.pipeline import PipelineResult
from workers.storage import Storage


def list_artifacts(storage: Storage, job_id: str, files: dict) -> list[dict]:
    """Every file of the published model with its size, sha256 and storage URI; ``merge.json`` last."""
    out = [{"path": name, "size": int(meta["size"]), "sha256": meta["sha256"], "uri": storage.uri(job_id, f"model/{name}")}
           for name, meta in sorted(files.items())]
    marker = storage.read_bytes(job_id, "model/merge.json")
    out.append({"path": "merge.json", "size": len(marker), "sha256": hashlib.sha256(marker).hexdigest(),
                "uri": storage.uri(job_id, "model/merge.json")})
    return out


def build_report(job, outcome: PipelineResult, artifacts: list[dict], timings: dict) -> dict[str, Any]:
    result = outcome.merge
    m = result.manifest
    return {
        "format": "submerge.report/0",
        "job_id": job.id,
        "method": m.get("method"),
        "params": m.get("params"),
        "created": m.get("created"),
        "software": m.get("software"),
        "device": m.get("device"),
        "compute_dtype": m.get("compute_dtype"),
        "attempts": job.attempts,
        "inputs": m.get("inputs"),
        "files": m.get("files"),
        "artifacts": artifacts,
        "timings_s": {**(m.get("timings_s") or {}), **{k: round(v, 3) for k, v in outcome.timings.items()
                                                         if k != "merge"}, **timings},
        "coverage": {"summary": m.get("coverage"), "tensors": m.get("tensors")},
        "notes": m.get("notes"),
        "diagnostics": result.diagnostics,
        "calibration": outcome.calibration,
        "evaluation": outcome.evaluation,
    }


__all__ = ["build_report", "list_artifacts"]
