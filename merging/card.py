"""What a merge records beside the weights: the coverage list (one row per tensor, with its role,
whether it was merged or copied, and why), the manifest (``merge.json``), the model card
(``README.md``), the diagnostics report and the base's side files (config, tokenizer). URIs
recorded in them lose credentials and signatures (``redact_uri``)."""
from __future__ import annotations

import concurrent.futures
import datetime as _dt
import json
import os
from typing import Any

import torch

from merging import __version__
from merging.io.checkpoint import Checkpoint
from merging.io.hashing import sha256_file
from merging.io.sources import redact_uri
from merging.io.writer import Publisher
from merging.methods.base import MethodParams
from merging.plan import PlanItem, PreparedMerge
from merging.spec import MergeSpec

MANIFEST_FORMAT = "submerge.merge/1"


def coverage_row(item: PlanItem, action: str, **extra) -> dict:
    """One tensor of the coverage list: ``action`` is ``merged`` or ``copied``; ``extra`` (the
    coefficient, the rescale group) is recorded when not None."""
    row = {"key": item.key, "shape": list(item.out_shape), "dtype": str(item.out_dtype).removeprefix("torch."),
           "role": item.role.role.value, "transposed": item.role.transposed, "role_source": item.role.source, "action": action}
    if item.reason:
        row["reason"] = item.reason
    if item.note:
        row["note"] = item.note
    row.update({k: v for k, v in extra.items() if v is not None})
    return row


def redacted_spec(spec: MergeSpec) -> dict:
    """The spec as recorded in merge.json and the model card: URIs without credentials or signatures."""
    def walk(obj):
        if isinstance(obj, dict):
            return {k: (redact_uri(v) if k in ("uri", "callback_url") and isinstance(v, str) else walk(v)) for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        return obj
    return walk(spec.model_dump(mode="json", by_alias=True))


def hash_inputs(hasher: concurrent.futures.Executor, checkpoints: list[Checkpoint],
                cache_dir: str) -> dict[str, dict[str, concurrent.futures.Future]]:
    """Start hashing every data file of the inputs on ``hasher`` (while the merge runs):
    checkpoint label -> file name -> future sha256."""
    return {ck.label: {name: hasher.submit(lambda loc=loc: sha256_file(loc.local_path(), cache_dir))
                       for name, loc in ck.data_files().items()}
            for ck in checkpoints}


def describe_inputs(spec: MergeSpec, checkpoints: list[Checkpoint],
                    hashes: dict[str, dict[str, concurrent.futures.Future]]) -> list[dict[str, Any]]:
    """The manifest's ``inputs``: base then experts, each with its redacted URI and files' sha256."""
    return [{"name": ck.label, "uri": redact_uri(ref.uri), "revision": ref.revision, "format": ck.format,
             "files": {n: f.result() for n, f in hashes[ck.label].items()}}
            for ck, ref in zip(checkpoints, [spec.base, *spec.experts])]


def file_entry(directory: str, name: str, sha256: str | None = None) -> dict[str, Any]:
    """A staged output file as the manifest lists it (hashed now unless its digest is known)."""
    path = os.path.join(directory, name)
    return {"sha256": sha256 or sha256_file(path, persist=False), "size": os.path.getsize(path)}


def build_manifest(spec: MergeSpec, params: MethodParams, device: torch.device, inputs: list[dict[str, Any]],
                   files: dict[str, dict[str, Any]], coverage: list[dict], notes: dict[str, Any]) -> dict[str, Any]:
    """merge.json without its timings (the caller adds ``timings_s`` last)."""
    return {
        "format": MANIFEST_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "software": {"submerge": __version__, "torch": torch.__version__},
        "method": spec.method,
        "params": params.model_dump(mode="json", by_alias=True),
        "spec": redacted_spec(spec),
        "device": str(device), "compute_dtype": spec.options.compute_dtype,
        "inputs": inputs,
        "files": files,
        "coverage": {"total": len(coverage), "merged": sum(1 for c in coverage if c["action"] == "merged"),
                     "copied": sum(1 for c in coverage if c["action"] == "copied")},
        "tensors": coverage,
        "notes": notes,
    }


def model_card(manifest: dict) -> str:
    lines = [
        "---", "tags: [merge, submerge]", "---", "",
        f"# Merged model ({manifest['method']})", "",
        f"Merged with submerge {manifest['software']['submerge']} (torch {manifest['software']['torch']}) on {manifest['created']}.", "",
        "## Method", "", f"`{manifest['method']}` with parameters:", "", "```json", json.dumps(manifest["params"], indent=2), "```", "",
        "## Inputs", "", "| role | URI | file | sha256 |", "|---|---|---|---|",
    ]
    for inp in manifest["inputs"]:
        for name, digest in inp["files"].items():
            lines.append(f"| {inp['name']} | `{inp['uri']}` | {name} | `{digest}` |")
    cov = manifest["coverage"]
    lines += ["", "## Coverage", "", f"{cov['total']} tensors: {cov['merged']} merged, {cov['copied']} copied from the base. "
              "The full per-tensor list (with the layer role each tensor got) is in `merge.json`.", ""]
    return "\n".join(lines)


def stage_card(directory: str, spec: MergeSpec, prepared: PreparedMerge, shards: dict[str, str | None],
               input_hashes: dict[str, dict[str, concurrent.futures.Future]], coverage: list[dict],
               diagnostics: dict[str, Any] | None, timings: dict[str, float]) -> tuple[dict[str, dict], dict[str, Any]]:
    """Write everything that goes beside the weights into the staging ``directory`` but the
    manifest itself: diagnostics.json, the base's side files and README.md. ``shards`` maps each
    written shard (and index) to its sha256 when the writer knows it. Returns the output files
    (name -> sha256 and size) and the manifest without its timings."""
    names = list(shards)
    if diagnostics is not None:
        # The artifact is a pure function of the inputs (like the model); what the analysis cost
        # goes to merge.json's timings instead.
        cost = diagnostics.pop("cost_s", {})
        timings["diagnostics_cpu"] = float(cost.get("total", 0.0))
        write_file(directory, "diagnostics.json", json.dumps(diagnostics, indent=1))
        names.append("diagnostics.json")
        diagnostics["cost_s"] = cost
    for name, loc in prepared.base.side_files.items():  # the base's, or as options.vocab 'union' updated them
        write_file(directory, name, prepared.side_files.get(name) or loc.read_all())
        names.append(name)
    files = {n: file_entry(directory, n, shards.get(n)) for n in names}
    method = prepared.method
    inputs = describe_inputs(spec, [prepared.base, *prepared.experts], input_hashes)
    manifest = build_manifest(spec, method.params, method.ctx.device, inputs, files, coverage, method.ctx.notes)
    write_file(directory, "README.md", model_card(manifest))
    files["README.md"] = file_entry(directory, "README.md")  # (the manifest holds ``files``: listed there too)
    return files, manifest


def write_manifest(directory: str, manifest: dict[str, Any]) -> None:
    """merge.json, written last: a model directory without it is not finished."""
    write_file(directory, Publisher.MARKER, json.dumps(manifest, indent=1))


def write_file(directory: str, name: str, content: str | bytes) -> None:
    with open(os.path.join(directory, name), "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)
