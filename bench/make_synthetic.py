#!/usr/bin/env python3
"""Seeded synthetic open_clip ViT-B/16 *visual* checkpoints for the performance benchmark.

Writes, under ``bench/.cache/synthetic/<config>/`` (``<config>`` = ``vitb16_b{blocks}_s{seed}``):

* ``base.safetensors``: the "pretrained" visual tower, initialised like open_clip
  (12 blocks, d = 768, 16x16 patches, 197 tokens, output 512: 86.2 M parameters, 344.8 MB in fp32).
* ``expert{t}.safetensors`` for t = 0..T-1: base + task vector. Every 2-D task vector is
  low rank plus noise: ``c_t * L_common + L_t + noise`` with rank-16 ``L_common`` (shared by
  all experts, per-expert weight ``c_t`` in [0.5, 1.5]) and rank-16 ``L_t`` (task specific),
  singular values decaying geometrically 1 -> 0.1, energy split 20 % / 60 % / 20 % (cosine between two task vectors ~0.2). Other
  tensors get Gaussian task vectors. Every task vector has entry RMS ``--tv-rms`` (1e-3), i.e.
  3-5 % of the RMS of the ViT matrices it is added to (0.007-0.036).
* ``calib/expert{t}.safetensors`` (``--calibration``): ESM calibration statistics, per ESD key
  ``<key>:gram`` = X^T X (float32, d_in x d_in) of N = 32 * 197 = 6304 synthetic layer-input rows
  and ``<key>:count`` = N (int64, shape (1,)), for ``attn.in_proj_weight``, ``mlp.c_fc.weight``
  and ``mlp.c_proj.weight`` of every block.

Each tensor is drawn from its own generator seeded by (seed, what, key, expert), so expert t
is identical whatever T is (T = 4 uses expert0..3 of the same directory) and the first blocks
of a deeper model equal a shallower one. Existing files are kept (delete the directory to
regenerate). Usage::

    python bench/make_synthetic.py --blocks 12 --experts 8 [--calibration]
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(ROOT, ".cache", "synthetic")

WIDTH, PATCH, GRID, OUT_DIM = 768, 16, 14, 512
TOKENS = GRID * GRID + 1  # 197
N_CALIB = 32 * TOKENS  # 6304 tokens: 32 proxy images, every token a row (ALGORITHMS.md §4.1)
RANK = 16
ESD_SUFFIXES = ("attn.in_proj_weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def config_name(blocks: int, seed: int) -> str:
    return f"vitb16_b{blocks}_s{seed}"


def config_dir(blocks: int, seed: int) -> str:
    return os.path.join(CACHE, config_name(blocks, seed))


def vit_b16_shapes(blocks: int) -> list[tuple[str, tuple[int, ...]]]:
    """Key order and shapes of open_clip ``VisionTransformer`` (ViT-B/16) state dicts."""
    d = WIDTH
    keys: list[tuple[str, tuple[int, ...]]] = [
        ("visual.class_embedding", (d,)),
        ("visual.positional_embedding", (TOKENS, d)),
        ("visual.proj", (d, OUT_DIM)),
        ("visual.conv1.weight", (d, 3, PATCH, PATCH)),
        ("visual.ln_pre.weight", (d,)),
        ("visual.ln_pre.bias", (d,)),
    ]
    for i in range(blocks):
        p = f"visual.transformer.resblocks.{i}."
        keys += [
            (p + "ln_1.weight", (d,)), (p + "ln_1.bias", (d,)),
            (p + "attn.in_proj_weight", (3 * d, d)), (p + "attn.in_proj_bias", (3 * d,)),
            (p + "attn.out_proj.weight", (d, d)), (p + "attn.out_proj.bias", (d,)),
            (p + "ln_2.weight", (d,)), (p + "ln_2.bias", (d,)),
            (p + "mlp.c_fc.weight", (4 * d, d)), (p + "mlp.c_fc.bias", (4 * d,)),
            (p + "mlp.c_proj.weight", (d, 4 * d)), (p + "mlp.c_proj.bias", (d,)),
        ]
    keys += [("visual.ln_post.weight", (d,)), ("visual.ln_post.bias", (d,))]
    return keys


def _gen(*parts) -> torch.Generator:
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def base_tensor(key: str, shape: tuple[int, ...], blocks: int, seed: int) -> torch.Tensor:
    """open_clip-like initialisation (attn/proj/fc std as in open_clip's ``init_parameters``)."""
    g = _gen(seed, "base", key)
    d = WIDTH
    scale = d ** -0.5
    proj_std = d ** -0.5 * (2 * blocks) ** -0.5
    if key.endswith(("ln_1.weight", "ln_2.weight")) or key.endswith(("ln_pre.weight", "ln_post.weight")):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if key.endswith("bias"):
        return 0.02 * torch.randn(shape, generator=g)
    if key.endswith(("class_embedding", "positional_embedding", "visual.proj")):
        std = scale
    elif key.endswith("attn.in_proj_weight"):
        std = d ** -0.5
    elif key.endswith(("attn.out_proj.weight", "mlp.c_proj.weight")):
        std = proj_std
    elif key.endswith("mlp.c_fc.weight"):
        std = (2 * d) ** -0.5
    else:  # conv1
        std = 0.02
    return std * torch.randn(shape, generator=g)


def _unit_rms(x: torch.Tensor) -> torch.Tensor:
    return x / x.pow(2).mean().sqrt()


def _low_rank(m: int, n: int, g: torch.Generator) -> torch.Tensor:
    u = torch.randn(m, RANK, generator=g)
    v = torch.randn(RANK, n, generator=g)
    s = torch.logspace(0, -1, RANK)  # 1 -> 0.1
    return _unit_rms((u * s) @ v)


def task_vector(key: str, shape: tuple[int, ...], expert: int, seed: int, tv_rms: float) -> torch.Tensor:
    g = _gen(seed, "task", key, expert)
    if len(shape) != 2:
        return tv_rms * torch.randn(shape, generator=g)
    m, n = shape
    common = _low_rank(m, n, _gen(seed, "common", key))
    c_t = 0.5 + torch.rand((), generator=_gen(seed, "coef", expert)).item()
    specific = _low_rank(m, n, g)
    noise = torch.randn(shape, generator=g)
    tau = math.sqrt(0.20) * c_t * common + math.sqrt(0.60) * specific + math.sqrt(0.20) * noise
    return tv_rms * _unit_rms(tau)


def _save(tensors: dict[str, torch.Tensor], path: str) -> None:
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


def calibration_stats(base: dict[str, torch.Tensor], blocks: int, expert: int, seed: int) -> dict[str, torch.Tensor]:
    """Gram matrices of synthetic layer inputs for the three ESD keys of every block.

    ln_1 / ln_2 outputs: anisotropic Gaussian rows (log-normal channel scales, 4 "massive
    activation" channels) plus a rank-8 shared component; the c_proj input is
    GELU(ln_2 output @ W_fc^T + b) with the base model's c_fc weights.
    """
    d = WIDTH
    out: dict[str, torch.Tensor] = {}
    count = torch.tensor([N_CALIB], dtype=torch.int64)
    for i in range(blocks):
        p = f"visual.transformer.resblocks.{i}."
        for which, key in (("ln1", p + "attn.in_proj_weight"), ("ln2", p + "mlp.c_fc.weight")):
            g = _gen(seed, "calib", expert, i, which)
            scales = torch.exp(0.5 * torch.randn(d, generator=g))
            scales[torch.randperm(d, generator=g)[:4]] *= 20.0
            x = torch.randn(N_CALIB, d, generator=g) * scales + torch.randn(N_CALIB, 8, generator=g) @ torch.randn(8, d, generator=g)
            out[key + ":gram"] = x.T @ x
            out[key + ":count"] = count.clone()
            if which == "ln2":
                h = torch.nn.functional.gelu(x @ base[p + "mlp.c_fc.weight"].T + base[p + "mlp.c_fc.bias"])
                out[p + "mlp.c_proj.weight:gram"] = h.T @ h
                out[p + "mlp.c_proj.weight:count"] = count.clone()
                del h
            del x
    return out


def ensure(blocks: int = 12, experts: int = 8, seed: int = 0, tv_rms: float = 1e-3, calibration: bool = False,
           verbose: bool = True) -> str:
    """Create whatever is missing for (blocks, experts, seed); return the directory."""
    root = config_dir(blocks, seed)
    os.makedirs(root, exist_ok=True)
    shapes = vit_b16_shapes(blocks)
    base_path = os.path.join(root, "base.safetensors")
    base: dict[str, torch.Tensor] | None = None

    def get_base() -> dict[str, torch.Tensor]:
        nonlocal base
        if base is None:
            if os.path.exists(base_path):
                from safetensors.torch import load_file
                base = load_file(base_path)
            else:
                t = time.perf_counter()
                base = {k: base_tensor(k, s, blocks, seed).contiguous() for k, s in shapes}
                _save(base, base_path)
                if verbose:
                    print(f"  wrote {base_path} ({os.path.getsize(base_path) / 1e6:.1f} MB, {time.perf_counter() - t:.1f}s)", flush=True)
        return base

    get_base()
    for e in range(experts):
        path = os.path.join(root, f"expert{e}.safetensors")
        if os.path.exists(path):
            continue
        t = time.perf_counter()
        b = get_base()
        _save({k: (b[k] + task_vector(k, s, e, seed, tv_rms)).contiguous() for k, s in shapes}, path)
        if verbose:
            print(f"  wrote {path} ({time.perf_counter() - t:.1f}s)", flush=True)
    if calibration:
        os.makedirs(os.path.join(root, "calib"), exist_ok=True)
        for e in range(experts):
            path = os.path.join(root, "calib", f"expert{e}.safetensors")
            if os.path.exists(path):
                continue
            t = time.perf_counter()
            _save(calibration_stats(get_base(), blocks, e, seed), path)
            if verbose:
                print(f"  wrote {path} ({time.perf_counter() - t:.1f}s)", flush=True)
    return root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tv-rms", type=float, default=1e-3, help="entry RMS of every task vector")
    ap.add_argument("--calibration", action="store_true", help="also write ESM calibration Gram matrices")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    root = ensure(args.blocks, args.experts, args.seed, args.tv_rms, args.calibration)
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
