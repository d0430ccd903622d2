#!/usr/bin/env python3
"""Synthetic LLM-shaped checkpoints for the speed/memory benchmark against mergekit (bench/llm/run.py).

Writes ``bench/.cache/llm/<set>/{base,expert0,...}/`` as Hugging Face model directories: a
``config.json`` of a real ``LlamaForCausalLM`` and safetensors weights with the real HF key names.

Sets:

* ``llama8b``: Llama-3-8B shapes (hidden 4096, intermediate 14336, 32 heads, 8 KV heads so k/v_proj
  are 1024x4096, vocab 128256, untied lm_head), bf16, sharded into two files with
  ``model.safetensors.index.json`` as HF writes them. ``--layers`` defaults to 1 (~2.5 GB a model:
  the embedding and lm_head alone are 2 x 1.05 GB); 8 experts by default.
* ``llama_small``: hidden 1024, intermediate 2816, 16 heads, 4 KV heads, vocab 8000, 4 layers, fp32,
  one ``model.safetensors``; 4 experts by default.

Weights: base ~ N(0, 0.02) (norm weights 1 + N(0, 0.02)); expert i = base + task vector, the task
vector being a rank-4 part plus i.i.d. noise with entry RMS ``--tau-rms`` (default 1e-3, i.e. ~5% of
the weights' scale of 0.02, so that it survives bf16 rounding: bf16 keeps ~3 significant digits).
Every tensor comes from its own generator seeded by (seed, set, key, model), so any model can be
written alone, tensor by tensor, and a shard holds only its own tensors in memory.

A marker file (``.complete.json``) holds the generation parameters; a model whose marker matches is
not written again.

    .venv/bin/python bench/llm/make_llm.py --set llama8b --experts 8
    .venv/bin/python bench/llm/make_llm.py --set llama_small
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import zlib

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.path.join(ROOT, "bench", ".cache", "llm")
MARKER = ".complete.json"
GENERATOR_VERSION = 2

SETS = {
    "llama8b": dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256, layers=1,
                    dtype="bfloat16", shards=2, experts=8, max_pos=8192),
    "llama_small": dict(hidden=1024, intermediate=2816, heads=16, kv_heads=4, vocab=8000, layers=4,
                        dtype="float32", shards=1, experts=4, max_pos=2048),
}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
WEIGHT_STD = 0.02
RANK = 4


def set_dir(name: str) -> str:
    return os.path.join(CACHE, name)


def hf_config(cfg: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": cfg["hidden"] // cfg["heads"],
        "hidden_act": "silu",
        "hidden_size": cfg["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": cfg["intermediate"],
        "max_position_embeddings": cfg["max_pos"],
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": cfg["heads"],
        "num_hidden_layers": cfg["layers"],
        "num_key_value_heads": cfg["kv_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": cfg["dtype"],
        "transformers_version": "4.40.0",
        "use_cache": True,
        "vocab_size": cfg["vocab"],
    }


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Keys in the order HF writes them (embedding, layers, final norm, lm_head)."""
    h, f, v = cfg["hidden"], cfg["intermediate"], cfg["vocab"]
    kv = cfg["kv_heads"] * (h // cfg["heads"])
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (f, h)),
            (p + "mlp.up_proj.weight", (f, h)),
            (p + "mlp.down_proj.weight", (h, f)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def shard_plan(cfg: dict) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split the keys, in order, into ``cfg['shards']`` runs of about equal bytes (as HF's max_shard_size does)."""
    items = tensor_shapes(cfg)
    n = cfg["shards"]
    if n <= 1:
        return [items]
    total = sum(numel(s) for _, s in items)
    target = total / n
    shards, cur, acc = [], [], 0
    for key, shape in items:
        if cur and acc + numel(shape) / 2 > target * (len(shards) + 1) and len(shards) < n - 1:
            shards.append(cur)
            cur = []
        cur.append((key, shape))
        acc += numel(shape)
    shards.append(cur)
    return shards


def _gen(seed: int, *parts) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32("/".join(map(str, parts)).encode())) % (2**63))
    return g


def base_tensor(cfg: dict, set_name: str, key: str, shape, seed: int) -> torch.Tensor:
    dt = DTYPES[cfg["dtype"]]
    g = _gen(seed, set_name, key, "base")
    w = torch.empty(shape, dtype=dt).normal_(0.0, WEIGHT_STD, generator=g)  # randn and scaling in one pass
    if len(shape) == 1:
        w.add_(1.0)
    return w


def make_tensor(cfg: dict, set_name: str, key: str, shape, expert: int | None, seed: int, tau_rms: float,
                base_reader=None) -> torch.Tensor:
    """Base tensor (expert None) or expert ``expert`` = base + task vector, in the set's dtype.

    ``base_reader(key)``: the base tensor as written (read back instead of generated again: same values)."""
    dt = DTYPES[cfg["dtype"]]
    w = base_reader(key) if base_reader is not None else None
    if w is None:
        w = base_tensor(cfg, set_name, key, shape, seed)
    if expert is None:
        return w
    g = _gen(seed, set_name, key, "expert", expert)
    if len(shape) == 2:
        # rank-RANK part with entry RMS tau_rms / sqrt(2), noise with the same: total RMS ~ tau_rms
        r = RANK
        u = torch.randn(shape[0], r, generator=g, dtype=torch.float32)
        vt = torch.randn(r, shape[1], generator=g, dtype=torch.float32)
        s = tau_rms / (2 ** 0.5)
        u.mul_(s / (r ** 0.5))
        step = max(1, (1 << 24) // shape[1])  # fp32 product in row blocks of ~64 MB
        for a in range(0, shape[0], step):
            w[a:a + step].add_((u[a:a + step] @ vt).to(dt))
    else:
        s = tau_rms
    w.add_(torch.empty(shape, dtype=dt).normal_(0.0, s, generator=g))
    return w


def gen_params(set_name: str, cfg: dict, expert: int | None, seed: int, tau_rms: float) -> dict:
    return {"generator_version": GENERATOR_VERSION, "set": set_name, "config": cfg, "model": "base" if expert is None else f"expert{expert}",
            "seed": seed, "tau_rms": tau_rms, "weight_std": WEIGHT_STD, "rank": RANK}


def write_model(path: str, set_name: str, cfg: dict, expert: int | None, seed: int, tau_rms: float) -> bool:
    """Write one model directory; return False when a matching one is already there."""
    params = gen_params(set_name, cfg, expert, seed, tau_rms)
    marker = os.path.join(path, MARKER)
    if os.path.exists(marker):
        try:
            with open(marker) as f:
                if json.load(f) == json.loads(json.dumps(params)):
                    return False
        except (OSError, ValueError):
            pass
    if os.path.isdir(path):
        shutil.rmtree(path)
    tmp = path + ".tmp"
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_config(cfg), f, indent=2)
    shards = shard_plan(cfg)
    weight_map, total_size = {}, 0
    base_reader, handles = None, {}
    base_dir = os.path.join(os.path.dirname(path), "base")
    if expert is not None and os.path.exists(os.path.join(base_dir, MARKER)):
        with open(os.path.join(base_dir, MARKER)) as f:
            same = json.load(f) == json.loads(json.dumps(gen_params(set_name, cfg, None, seed, tau_rms)))
        if same:
            from safetensors import safe_open

            files = {k: ("model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
                     for i, sh in enumerate(shards) for k, _ in sh}

            def base_reader(key):
                fn = files[key]
                if fn not in handles:
                    handles[fn] = safe_open(os.path.join(base_dir, fn), framework="pt")
                return handles[fn].get_tensor(key).clone()
    itemsize = torch.empty((), dtype=DTYPES[cfg["dtype"]]).element_size()
    for si, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for key, shape in shard:
            tensors[key] = make_tensor(cfg, set_name, key, shape, expert, seed, tau_rms, base_reader)
            weight_map[key] = fname
            total_size += numel(shape) * itemsize
        save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
        del tensors
    handles.clear()
    if len(shards) > 1:
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump(params, f, indent=2)
    os.rename(tmp, path)
    return True


def model_bytes(cfg: dict) -> int:
    itemsize = torch.empty((), dtype=DTYPES[cfg["dtype"]]).element_size()
    return sum(numel(s) for _, s in tensor_shapes(cfg)) * itemsize


def resolve_cfg(set_name: str, layers: int | None = None) -> dict:
    cfg = dict(SETS[set_name])
    if layers is not None:
        cfg["layers"] = layers
    cfg.pop("experts")
    return cfg


def ensure_set(set_name: str, experts: int | None = None, layers: int | None = None, seed: int = 0,
               tau_rms: float = 1e-3, log=print) -> dict:
    """Make sure base/ and expert0..expert{n-1}/ exist; return a description of the set."""
    n = experts if experts is not None else SETS[set_name]["experts"]
    cfg = resolve_cfg(set_name, layers)
    d = set_dir(set_name)
    os.makedirs(d, exist_ok=True)
    models = [("base", None)] + [(f"expert{i}", i) for i in range(n)]
    t0 = time.perf_counter()
    for name, idx in models:
        t1 = time.perf_counter()
        wrote = write_model(os.path.join(d, name), set_name, cfg, idx, seed, tau_rms)
        if wrote:
            log(f"make_llm: wrote {set_name}/{name} ({model_bytes(cfg) / 1e9:.2f} GB) in {time.perf_counter() - t1:.1f}s")
    log(f"make_llm: {set_name}: base + {n} experts ready in {d} ({time.perf_counter() - t0:.1f}s)")
    return {"set": set_name, "dir": d, "config": cfg, "experts": n, "model_bytes": model_bytes(cfg),
            "base": os.path.join(d, "base"), "expert_dirs": [os.path.join(d, f"expert{i}") for i in range(n)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="llama8b", choices=sorted(SETS))
    ap.add_argument("--experts", type=int, default=None, help="default: 8 (llama8b), 4 (llama_small)")
    ap.add_argument("--layers", type=int, default=None, help="default: 1 (llama8b), 4 (llama_small)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tau-rms", type=float, default=1e-3, help="entry RMS of the task vectors (weights: 0.02)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ensure_set(args.set, args.experts, args.layers, args.seed, args.tau_rms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
