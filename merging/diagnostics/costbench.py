"""Cost of the diagnostics next to the merge itself, on synthetic ViT-B/16-shaped task vectors.

    python -m merging.diagnostics.costbench [--experts 8] [--blocks 12] [--max-svd-layers 24] [--svd-fraction 0.15] [--hogsvd-layers 4]

Times, single-threaded (as the engine's CPU workers run), one representative matrix per shape
(in_proj 2304×768, out_proj 768×768, c_fc 3072×768, c_proj 768×3072, positional embedding
197×768, proj 768×512): the methods' ``merge`` and the collector's cheap and spectral work.
Totals for the model follow from the plan of a ``--blocks``-block open_clip ViT-B/16 visual tower
and the collector's deterministic sample. Task vectors are low rank + noise like
``bench/make_synthetic.py`` (shared rank-16 part, task rank-16 part, noise); costs hardly depend on
the values. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from merging.diagnostics.collector import DiagnosticsCollector, analyse_layer, select_layers, spectral_sample
from merging.diagnostics import metrics as M
from merging.methods import get_method
from merging.methods.base import MergeContext, TensorJob
from merging.roles import infer_role

D = 768


def vit_plan(blocks: int) -> list[tuple[str, tuple[int, int]]]:
    keys = [("visual.positional_embedding", (197, D)), ("visual.proj", (D, 512))]
    for i in range(blocks):
        p = f"visual.transformer.resblocks.{i}."
        keys += [(p + "attn.in_proj_weight", (3 * D, D)), (p + "attn.out_proj.weight", (D, D)),
                 (p + "mlp.c_fc.weight", (4 * D, D)), (p + "mlp.c_proj.weight", (D, 4 * D))]
    return keys


def synthetic_taus(shape: tuple[int, int], n_tasks: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m, n = shape

    def low_rank(rank: int) -> torch.Tensor:
        u = torch.linalg.qr(torch.randn(m, rank, generator=g))[0]
        v = torch.linalg.qr(torch.randn(n, rank, generator=g))[0]
        s = torch.logspace(0, -1, rank)
        return (u * s) @ v.mT

    common = low_rank(16)
    out = []
    for t in range(n_tasks):
        x = (0.5 + t / max(n_tasks - 1, 1)) * 0.45 * common + 0.77 * low_rank(16)
        x = x + 0.45 * x.norm() / (m * n) ** 0.5 * torch.randn(m, n, generator=g)
        out.append(1e-3 * x / x.pow(2).mean().sqrt())
    return torch.stack(out)


def _time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--max-svd-layers", type=int, default=24)
    ap.add_argument("--hogsvd-layers", type=int, default=4)
    ap.add_argument("--svd-fraction", type=float, default=0.15)
    ap.add_argument("--min-svd-layers", type=int, default=4)
    ap.add_argument("--methods", default="tsv_m,iso_c,iso_cts,task_arithmetic")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_count = args.experts
    names = [f"e{i}" for i in range(t_count)]
    plan = vit_plan(args.blocks)
    plan_keys = [k for k, _ in plan]
    svd_keys = set(spectral_sample(plan_keys, args.max_svd_layers, args.svd_fraction, args.min_svd_layers))
    hog_keys = set(select_layers([k for k in plan_keys if k in svd_keys], args.hogsvd_layers))
    methods = args.methods.split(",")
    ctx = MergeContext(names, torch.device("cpu"), torch.float32)
    per_shape: dict[str, dict] = {}
    for key, shape in plan[:6]:  # one of each shape (pos_emb, proj, then one block)
        role = infer_role(key, shape)
        taus = synthetic_taus(shape, t_count)
        job = TensorJob(key, role, taus, 0)
        row: dict[str, float] = {}
        merged = {}
        for name in methods:
            cls = get_method(name)
            meth = cls(cls.Params(), ctx)
            row[f"merge_{name}"] = _time(lambda: merged.__setitem__(name, meth.merge(job)), args.repeat)
        mg = merged[methods[0]]
        row["cheap"] = _time(lambda: M.flat_gram(taus, mg), args.repeat)
        res = {}
        row["svd"] = _time(lambda: res.__setitem__("a", analyse_layer(taus, mg, method=methods[0], params={}, role=role)), args.repeat)
        row["svd+hogsvd"] = _time(lambda: analyse_layer(taus, mg, method=methods[0], params={}, role=role, hogsvd=True), args.repeat)
        per_shape["x".join(map(str, shape))] = {k: round(v, 4) for k, v in row.items()}
    totals = {f"merge_{m}": 0.0 for m in methods}
    totals.update(cheap=0.0, svd=0.0, hogsvd=0.0)
    for key, shape in plan:
        row = per_shape["x".join(map(str, shape))]
        for m in methods:
            totals[f"merge_{m}"] += row[f"merge_{m}"]
        totals["cheap"] += row["cheap"]
        if key in svd_keys:
            totals["svd"] += row["svd"]
            if key in hog_keys:
                totals["hogsvd"] += row["svd+hogsvd"] - row["svd"]
    diag = totals["cheap"] + totals["svd"] + totals["hogsvd"]
    # A whole collector run on one block's keys, from 4 threads, to check the bookkeeping cost is negligible.
    coll = DiagnosticsCollector(methods[0], {}, names, 4, 1, plan_keys=plan_keys[2:6])
    t0 = time.perf_counter()
    for key, shape in plan[2:6]:
        taus = synthetic_taus(shape, t_count)
        job = TensorJob(key, infer_role(key, shape), taus, 0)
        coll.observe(job, job.taus.sum(0))
    coll.finish()
    out = {"experts": t_count, "blocks": args.blocks, "matrix_keys": len(plan), "svd_layers": len(svd_keys),
           "hogsvd_layers": len(hog_keys), "per_shape_s": per_shape,
           "model_totals_s": {k: round(v, 2) for k, v in totals.items()}, "diagnostics_total_s": round(diag, 2),
           "ratio_to_merge": {m: round(diag / totals[f"merge_{m}"], 3) for m in methods if totals[f"merge_{m}"] > 0},
           "one_block_collector_s": round(time.perf_counter() - t0, 2)}
    print(f"{'shape':>10} " + " ".join(f"{k:>22}" for k in next(iter(per_shape.values()))))
    for shape, row in per_shape.items():
        print(f"{shape:>10} " + " ".join(f"{v:>22.3f}" for v in row.values()))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
