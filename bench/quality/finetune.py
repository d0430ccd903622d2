"""Fine-tune one expert per task with the CLIP-style task-arithmetic recipe.

* The head of a task is the frozen, L2-normalised embedding of each class prompt
  (``prompt.format(label=class_name)``), computed once with the *pretrained* model; it is never trained.
* A text's embedding is the L2-normalised mean of the last hidden state over its real tokens;
  logits = 30 · cosine(embedding, head row). This is exactly what the service's ``text_zero_shot``
  evaluator computes, so an expert is scored the way it was trained.
* The whole encoder is trained except its embedding tables (``nn.Embedding``: word, position,
  token type), so the task vectors live in the transformer's linear layers (and its norms/biases):
  AdamW (lr 5e-5, weight decay 0.01), 20-step linear warm-up then linear decay, batch 32,
  ``max_length`` 48, dropout on, fixed seed, 200 steps.
* An expert is saved as an HF model directory: ``model.safetensors`` with exactly the base
  checkpoint's keys and dtypes (the untrained tensors are the base's bytes), the base's
  ``config.json`` and tokenizer files, and ``finetune.json`` (recipe, losses, timings).
  It is cached under ``<cache>/<task>-<hash>`` where the hash covers the recipe, the base
  checkpoint's bytes and the task's training data; a second call with the same inputs only reads
  ``finetune.json``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

RECIPE_VERSION = 1
SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
              "vocab.json", "merges.txt")


@dataclass(frozen=True)
class Recipe:
    steps: int = 200
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int = 20
    batch_size: int = 32
    max_length: int = 48
    logit_scale: float = 30.0
    seed: int = 0
    freeze_embeddings: bool = True
    dropout: bool = True  # train mode (the model's own dropout) during fine-tuning

    def as_dict(self) -> dict:
        return {"version": RECIPE_VERSION, **dataclasses.asdict(self)}


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def base_weights_file(base_dir: str | os.PathLike) -> Path:
    p = Path(base_dir) / "model.safetensors"
    if not p.is_file():
        raise FileNotFoundError(f"{base_dir}: no model.safetensors (the benchmark needs a single-file safetensors base)")
    return p


def expert_key(recipe: Recipe, base_sha: str, data_digest: str) -> str:
    blob = json.dumps({"recipe": recipe.as_dict(), "base": base_sha, "data": data_digest}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L2-normalised mean of ``hidden`` (B, L, d) over the tokens where ``mask`` (B, L) is 1."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    mean = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    return torch.nn.functional.normalize(mean, dim=-1)


def embed(model, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 64) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        out.append(mean_pool(hidden.float(), enc["attention_mask"]))
    return torch.cat(out)


@torch.no_grad()
def prompt_head(model, tokenizer, class_names: Sequence[str], prompt: str, max_length: int) -> torch.Tensor:
    """(C, d) frozen head: the unit embeddings of ``prompt.format(label=c)`` for each class (eval mode)."""
    was_training = model.training
    model.eval()
    try:
        return embed(model, tokenizer, [prompt.format(label=c) for c in class_names], max_length).detach().clone()
    finally:
        model.train(was_training)


def freeze_embedding_tables(model: torch.nn.Module) -> list[str]:
    """``requires_grad = False`` on every ``nn.Embedding``; returns the frozen parameter names."""
    frozen = []
    for mname, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            for pname, p in module.named_parameters():
                p.requires_grad_(False)
                frozen.append(f"{mname}.{pname}" if mname else pname)
    return frozen


def _lr_lambda(recipe: Recipe):
    def f(step: int) -> float:
        if recipe.warmup_steps and step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        rest = max(1, recipe.steps - recipe.warmup_steps)
        return max(0.0, (recipe.steps - step) / rest)
    return f


def train_expert(model, tokenizer, rows: Sequence[tuple[str, int]], head: torch.Tensor, recipe: Recipe,
                 progress: Callable[[int, int, float], None] | None = None) -> list[float]:
    """Fine-tune ``model`` in place on ``rows`` (text, class index) against the frozen ``head``.
    Returns the loss of every step."""
    if not rows:
        raise ValueError("no training rows")
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    if recipe.freeze_embeddings:
        freeze_embedding_tables(model)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe))
    head = torch.nn.functional.normalize(head.detach().float(), dim=-1)
    model.train(recipe.dropout)
    order: list[int] = []
    losses = []
    for step in range(recipe.steps):
        if len(order) < recipe.batch_size:  # epochs of seeded permutations
            perm = list(range(len(rows)))
            rng.shuffle(perm)
            order.extend(perm)
        idx, order = order[:recipe.batch_size], order[recipe.batch_size:]
        texts = [rows[i][0] for i in idx]
        target = torch.tensor([rows[i][1] for i in idx], dtype=torch.long)
        enc = tokenizer(texts, padding=True, truncation=True, max_length=recipe.max_length, return_tensors="pt")
        emb = mean_pool(model(**enc).last_hidden_state.float(), enc["attention_mask"])
        loss = torch.nn.functional.cross_entropy(recipe.logit_scale * emb @ head.T, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, recipe.steps, losses[-1])
    model.eval()
    return losses


def save_expert(model, base_dir: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Write ``model``'s tensors under the base checkpoint's keys and dtypes (every key must be found
    in the model), plus the base's config and tokenizer files."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    base_file = base_weights_file(base_dir)
    state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "") or ""
    tensors = {}
    with safe_open(str(base_file), "pt") as f:
        meta = f.metadata() or {}
        for key in f.keys():
            base_t = f.get_tensor(key)
            name = key if key in state else (f"{prefix}.{key}" if f"{prefix}.{key}" in state else None)
            if name is None:
                if base_t.is_floating_point():
                    raise KeyError(f"{base_file}: tensor {key!r} has no counterpart in {type(model).__name__}")
                tensors[key] = base_t.contiguous()  # buffers the model does not keep (position_ids)
                continue
            t = state[name].detach().to("cpu")
            if tuple(t.shape) != tuple(base_t.shape):
                raise ValueError(f"{key}: shape {list(t.shape)} vs the base's {list(base_t.shape)}")
            tensors[key] = t.to(base_t.dtype).contiguous() if base_t.is_floating_point() else base_t.contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": meta.get("format", "pt")})
    for name in SIDE_FILES:
        src = Path(base_dir) / name
        if src.is_file():
            shutil.copyfile(src, out / name)


def load_base(base_dir: str | os.PathLike):
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(base_dir), local_files_only=True)
    return model, tok


def finetune(base_dir: str | os.PathLike, task, cache_dir: str | os.PathLike, recipe: Recipe = Recipe(), *,
             base_sha: str | None = None, data_digest: str | None = None, log: Callable[[str], None] | None = print,
             progress_every: int = 25) -> dict:
    """The expert of ``task`` (a ``bench.quality.tasks.Task``): from the cache when its key is there,
    else fine-tuned and stored. Returns ``finetune.json``'s content plus ``path`` and ``cached``."""
    from bench.quality.tasks import data_digest as _data_digest

    base_sha = base_sha or file_sha256(base_weights_file(base_dir))
    data_digest = data_digest or _data_digest(task)
    key = expert_key(recipe, base_sha, data_digest)
    target = Path(cache_dir).resolve() / f"{task.name}-{key[:16]}"
    info_path = target / "finetune.json"
    if info_path.is_file() and (target / "model.safetensors").is_file():
        info = json.loads(info_path.read_text())
        if info.get("key") == key:
            if log:
                log(f"  {task.name}: cached expert {target}")
            return {**info, "path": str(target), "cached": True}

    torch.manual_seed(recipe.seed)
    model, tok = load_base(base_dir)
    head = prompt_head(model, tok, task.class_names, task.prompt, recipe.max_length)
    t0 = time.perf_counter()

    def progress(step, total, loss):
        if log and (step % progress_every == 0 or step == total):
            el = time.perf_counter() - t0
            log(f"  {task.name}: step {step}/{total} loss {loss:.3f} ({el:.0f} s, ~{el / step * (total - step):.0f} s left)")

    losses = train_expert(model, tok, task.train, head, recipe, progress)
    train_s = time.perf_counter() - t0
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=str(Path(cache_dir).resolve()), prefix=f".{task.name}-"))
    try:
        save_expert(model, base_dir, tmp)
        k = max(1, len(losses) // 10)
        info = {"key": key, "task": task.name, "recipe": recipe.as_dict(), "base_sha256": base_sha,
                "data_digest": data_digest, "class_names": task.class_names, "prompt": task.prompt,
                "train_rows": len(task.train), "train_seconds": round(train_s, 2),
                "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
                "losses": [round(x, 5) for x in losses]}
        (tmp / "finetune.json").write_text(json.dumps(info, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if log:
        log(f"  {task.name}: fine-tuned in {train_s:.0f} s, loss {info['loss_first']:.3f} -> {info['loss_last']:.3f}")
    return {**info, "path": str(target), "cached": False}


__all__ = ["Recipe", "expert_key", "mean_pool", "prompt_head", "freeze_embedding_tables", "train_expert", "save_expert",
           "finetune", "file_sha256", "base_weights_file", "load_base"]
