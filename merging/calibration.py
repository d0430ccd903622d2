"""Calibration statistics for ESM: each expert's layer inputs, as seen by its fine-tuned model.

A calibration file is a safetensors file that maps a weight key either to the raw inputs that
layer saw (2-D, one row per token) or to their Gram matrix under ``<key>:gram`` (d_in × d_in,
XᵀX) with the token count under ``<key>:count``. Both give the same merge: ESM needs only
XᵀX and N (ALGORITHMS.md §4.1). Raw inputs are reduced to XᵀX in float64 as they are read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from merging.errors import CalibrationError, CorruptCheckpointError
from merging.io.safetensors_format import TensorMeta, header_length, parse_header, read_tensor
from merging.io.sources import IOConfig, Location
from merging.linalg import all_finite


@dataclass
class CalibrationFile:
    label: str
    uri: str
    metas: dict[str, TensorMeta]
    path: str | None = None

    def keys(self) -> set[str]:
        out = set()
        for k in self.metas:
            if k.endswith(":gram"):
                out.add(k[: -len(":gram")])
            elif not k.endswith(":count"):
                out.add(k)
        return out

    def _read(self, key: str) -> torch.Tensor:
        if self.path is None:
            raise RuntimeError("calibration file not opened")
        with open(self.path, "rb") as f:
            return read_tensor(f, self.metas[key])

    def stats(self, key: str, d_in: int) -> tuple[torch.Tensor, int]:
        """(XᵀX as float64 (d_in, d_in), token count N) for weight ``key``."""
        if f"{key}:gram" in self.metas:
            gram = self._read(f"{key}:gram")
            finite = all_finite(gram)
            gram = gram.to(torch.float64)
            if f"{key}:count" not in self.metas:
                raise CalibrationError(f"{self.label} calibration {self.uri}: '{key}:gram' has no '{key}:count' (the token count)")
            count_t = self._read(f"{key}:count")
            if count_t.numel() != 1:
                raise CalibrationError(f"{self.label} calibration: '{key}:count' must hold one number, has shape {list(count_t.shape)}")
            count = int(count_t.reshape(-1)[0].item())
            if tuple(gram.shape) != (d_in, d_in):
                raise CalibrationError(f"{self.label} calibration: '{key}:gram' has shape {list(gram.shape)}, expected [{d_in}, {d_in}] for the layer's input size")
        else:
            x = self._read(key)
            if x.ndim != 2 or x.shape[1] != d_in:
                raise CalibrationError(f"{self.label} calibration: inputs for {key!r} have shape {list(x.shape)}, expected [tokens, {d_in}]")
            finite = all_finite(x)  # then XᵀX is finite too: float64 cannot overflow on float32 inputs
            x = x.to(torch.float64)
            gram, count = x.mT @ x, x.shape[0]
        if count < 2:
            raise CalibrationError(f"{self.label} calibration: {key!r} needs at least 2 tokens, got {count}")
        if not finite:
            raise CalibrationError(f"{self.label} calibration: {key!r} holds NaN/Inf")
        return gram, count


class CalibrationSet:
    """One optional calibration file per expert, opened header-first."""

    def __init__(self, files: list[CalibrationFile | None], labels: list[str]):
        self.files = files
        self.labels = labels
        self.pending: set[str] = set()

    def require(self, keys: list[tuple[str, int]]) -> None:
        """Raise naming the expert and layer if any needed statistics are missing."""
        for f, label in zip(self.files, self.labels):
            if label in self.pending:
                continue  # captured from calibration.data when the job runs
            if f is None:
                raise CalibrationError(f"{label} has no calibration: ESM needs each expert's layer inputs "
                                       "(experts[i].calibration.uri)")
            have = f.keys()
            missing = [k for k, _ in keys if k not in have]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise CalibrationError(f"{label} calibration {f.uri} has no inputs for layer {missing[0]!r}{more}")

    def stats(self, t: int, key: str, d_in: int) -> tuple[torch.Tensor, int]:
        f = self.files[t]
        if f.path is None:
            f.path = Location(f.uri, self._cfg).local_path()
        return f.stats(key, d_in)


def _open_file(uri: str, label: str, cfg: IOConfig) -> CalibrationFile:
    loc = Location(uri, cfg)
    if not loc.exists():
        raise CalibrationError(f"{label} calibration: cannot read {uri}: not found")
    size = loc.size()
    prefix = loc.read_range(0, 1 << 16)
    try:
        n = header_length(prefix, f"{label} calibration ({uri})", size)
        raw = prefix if len(prefix) >= 8 + n else loc.read_range(0, 8 + n)
        metas, _ = parse_header(raw, f"{label} calibration ({uri})", size)
    except CorruptCheckpointError as e:
        raise CalibrationError(str(e)) from None
    return CalibrationFile(label, uri, metas, None if loc.remote else loc.path)


def open_calibration(spec, cfg: IOConfig, overrides: dict[str, str] | None = None, *,
                     pending_ok: bool = False) -> CalibrationSet:
    """One statistics file per expert: ``overrides[name]`` (statistics captured from the expert's
    ``calibration.data``), else ``calibration.uri``. With ``pending_ok`` (a pre-flight check), an
    expert whose statistics will be captured from ``calibration.data`` is passed over."""
    overrides = overrides or {}
    labels = [f"expert {n!r}" for n in spec.expert_names()]
    files = []
    pending = set()
    for e, name, label in zip(spec.experts, spec.expert_names(), labels):
        uri = overrides.get(name) or (e.calibration.uri if e.calibration else None)
        if uri is None and e.calibration is not None and pending_ok:
            pending.add(label)
        elif uri is None and e.calibration is not None:
            raise CalibrationError(f"{label}: calibration.data holds samples whose statistics have not been captured; "
                                   "submit the job to the service (which captures them) or run `submerge calibrate` "
                                   "and pass the file as calibration.uri")
        files.append(_open_file(uri, label, cfg) if uri else None)
    cs = CalibrationSet(files, labels)
    cs.pending = pending
    cs._cfg = cfg
    return cs
