#!/usr/bin/env python3
"""Run FusionBench's TSV-M / Iso-C / Iso-CTS on a synthetic config. Run with the fb venv's python:

    bench/.cache/fb-venv/bin/python bench/fusionbench_runner.py --method tsv_m --data DIR --experts 8 --out FILE

The most direct route FusionBench offers: a ``BaseModelPool`` whose entries are lazy
``_target_`` configs (instantiated by FusionBench's own ``instantiate`` when the algorithm asks
for a model, as its CLI model pools do), each loading one checkpoint into an ``nn.Module`` whose
``state_dict()`` keys are exactly the open_clip keys. Then the stock algorithm classes' ``run``:

* ``TaskSingularVectorMerging(alpha=1.0)``
* ``IsotropicMergingInCommonSubspace(scaling_factor=1.0)``
* ``IsotropicMergingInCommonAndTaskSubspace(scaling_factor=1.0, common_space_fraction=0.8)``

α = 1 everywhere, so the output's task vector is the merged task vector (ours runs with α = 1 too).
The merged state dict is saved as one safetensors file. Prints one ``RESULT`` JSON line; on a
crash it records the exception type and message and exits 1.
"""
from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402


def load_state_dict_module(path: str) -> nn.Module:
    """An nn.Module tree whose state_dict() is the checkpoint at ``path``, keys unchanged."""
    root = nn.Module()
    for key, tensor in load_file(path).items():
        *parts, name = key.split(".")
        mod = root
        for p in parts:
            child = mod._modules.get(p)
            if child is None:
                child = nn.Module()
                mod.add_module(p, child)
            mod = child
        mod.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
    return root


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", required=True, choices=["tsv_m", "iso_c", "iso_cts"])
    ap.add_argument("--data", required=True)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import fusion_bench
    from fusion_bench.method.isotropic_merging import (IsotropicMergingInCommonAndTaskSubspace,
                                                       IsotropicMergingInCommonSubspace)
    from fusion_bench.method.task_singular_vector import TaskSingularVectorMerging
    from fusion_bench.modelpool import BaseModelPool
    t_import = time.perf_counter() - T_START

    target = f"{__name__}.load_state_dict_module"
    models = {"_pretrained_": {"_target_": target, "path": os.path.join(args.data, "base.safetensors")}}
    for t in range(args.experts):
        models[f"task{t}"] = {"_target_": target, "path": os.path.join(args.data, f"expert{t}.safetensors")}
    pool = BaseModelPool(models)
    if args.method == "tsv_m":
        algo = TaskSingularVectorMerging(alpha=1.0)
    elif args.method == "iso_c":
        algo = IsotropicMergingInCommonSubspace(scaling_factor=1.0)
    else:
        algo = IsotropicMergingInCommonAndTaskSubspace(scaling_factor=1.0, common_space_fraction=0.8)

    result = {"fusion_bench": getattr(fusion_bench, "__version__", None), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "import_s": t_import}
    t0 = time.perf_counter()
    try:
        merged = algo.run(pool)  # prints a line per key (captured by run_bench.py)
    except Exception as e:  # noqa: BLE001  (record FusionBench's crash as a result)
        result.update(ok=False, error_type=f"{type(e).__module__}.{type(e).__qualname__}",
                      error=str(e).strip().splitlines()[0] if str(e).strip() else repr(e),
                      run_s=time.perf_counter() - t0, traceback=traceback.format_exc(limit=4))
        print("RESULT " + json.dumps(result), flush=True)
        return 1
    result["run_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    save_file({k: v.detach().contiguous() for k, v in merged.state_dict().items()}, args.out)
    result["save_s"] = time.perf_counter() - t1
    result["ok"] = True
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
