#!/usr/bin/env python3
"""Where the SVD methods' time goes: per-shape timings of the linear-algebra steps on one
ViT-B/16 block of the synthetic data (T experts), single-threaded (the engine runs one
single-threaded tensor per core) and with all cores.

    .venv/bin/python bench/profile_linalg.py [--experts 8] [--threads 1]

Times (seconds, best of --reps) for each 2-D shape of a block, scaled to the whole 12-block
model in the last column block ("x keys"): our building blocks from ``merging.linalg`` and the
method functions, next to what FusionBench calls (float32 LAPACK ``torch.linalg.svd`` per task).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

import make_synthetic  # noqa: E402
from merging import linalg  # noqa: E402
from merging.methods.iso_cts import iso_cts_matrix  # noqa: E402
from merging.methods.tsv_m import tsv_merge_matrix, tsvm_rank  # noqa: E402


def best(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=3, help="data config to read block 0 from")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d = make_synthetic.ensure(args.blocks, args.experts, verbose=False)
    T = args.experts
    keys = ["visual.transformer.resblocks.0.attn.in_proj_weight", "visual.transformer.resblocks.0.attn.out_proj.weight",
            "visual.transformer.resblocks.0.mlp.c_fc.weight", "visual.transformer.resblocks.0.mlp.c_proj.weight",
            "visual.positional_embedding", "visual.proj"]
    per_model = {k: (12 if "resblocks" in k else 1) for k in keys}
    rows = {}
    with safe_open(os.path.join(d, "base.safetensors"), "pt") as b:
        experts = [safe_open(os.path.join(d, f"expert{t}.safetensors"), "pt") for t in range(T)]
        for key in keys:
            base = b.get_tensor(key)
            taus = torch.stack([e.get_tensor(key) - base for e in experts])
            m, n = base.shape
            k = tsvm_rank(m, n, T)
            x64 = (taus.mT if m < n else taus).double()
            gram = x64.mT @ x64
            u, s, vh = linalg.top_singular(taus, k)
            u_cat = u.permute(1, 0, 2).reshape(m, T * k)
            v_cat = vh.reshape(T * k, n)
            r = {
                "shape": [m, n],
                "fb_svd_fp32_per_task_x T": best(lambda: [torch.linalg.svd(taus[t], full_matrices=False) for t in range(T)], args.reps),
                "gram_fp64_batched": best(lambda: (x64.mT @ x64), args.reps),
                "cast_to_fp64": best(lambda: taus.double(), args.reps),
                "eigh_fp64_batched": best(lambda: torch.linalg.eigh(gram), args.reps),
                "eigh_fp32_batched": best(lambda: torch.linalg.eigh(gram.float()), args.reps),
                "svdvals_fp64_batched": best(lambda: torch.linalg.svdvals(x64), 1),
                "top_singular": best(lambda: linalg.top_singular(taus, k), args.reps),
                "polar(U_cat)": best(lambda: linalg.polar(u_cat), args.reps),
                "polar(V_cat)": best(lambda: linalg.polar(v_cat), args.reps),
                "tsv_merge_matrix": best(lambda: tsv_merge_matrix(taus), args.reps),
                "iso_c (polar_with_sv of sum)": best(lambda: linalg.polar_with_singular_values(taus.sum(0)), args.reps),
                "fb_iso_c svd fp32 of sum": best(lambda: torch.linalg.svd(taus.sum(0), full_matrices=False), args.reps),
                "svd (linalg.svd of sum, fp32 gesdd)": best(lambda: linalg.svd(taus.sum(0)), args.reps),
                "iso_cts_matrix": best(lambda: iso_cts_matrix(taus, 0.8), args.reps),
            }
            rows[key.replace("visual.transformer.resblocks.0.", "block.")] = r
            print(f"{key} {m}x{n} k={k}", flush=True)
            for name, v in r.items():
                if name != "shape":
                    print(f"   {name:<40} {v:8.3f}s   x{per_model[key]:>2} keys = {v * per_model[key]:7.2f}s", flush=True)
    total = {}
    for key, r in rows.items():
        mult = 12 if key.startswith("block.") else 1
        for name, v in r.items():
            if name != "shape":
                total[name] = total.get(name, 0.0) + v * mult
    print("\nwhole 12-block model (sum over its 50 matrices), %d thread(s):" % args.threads)
    for name, v in total.items():
        print(f"   {name:<40} {v:8.2f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "experts": T, "per_key": rows, "model_total": total}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
