"""Helpers to turn the official golden vectors (../shared/golden) into checkpoints on disk."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

GOLDEN_DIR = Path(os.environ.get("SUBMERGE_GOLDEN_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "golden"))


def manifest() -> dict:
    return json.loads((GOLDEN_DIR / "manifest.json").read_text())


def golden_file(name: str) -> dict:
    for f in manifest()["files"]:
        if f["file"] == name:
            return f
    raise KeyError(name)


def load(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN_DIR / name))


def write_task_checkpoints(tensors: dict[str, torch.Tensor], n_tasks: int, keys: list[str], root: Path) -> tuple[str, list[str]]:
    """Base = zeros, expert t = tv.{t}.* (θ0 = 0, so merged θ equals the merged task vector when α = 1)."""
    root.mkdir(parents=True, exist_ok=True)
    base = {k: torch.zeros_like(tensors[f"tv.0.{k}"]) for k in keys}
    save_file(base, str(root / "base.safetensors"))
    experts = []
    for t in range(n_tasks):
        path = root / f"expert{t}.safetensors"
        save_file({k: tensors[f"tv.{t}.{k}"].contiguous() for k in keys}, str(path))
        experts.append(str(path))
    return str(root / "base.safetensors"), experts


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item() or 1.0
    return (out.double() - ref.double()).abs().max().item() / scale
