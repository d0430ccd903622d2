"""Fixture helpers for the evaluation tests: tiny random BERTs built offline, "fine-tuned"
experts made by perturbing them, and a separable text task. No test functions here."""
from __future__ import annotations

import json
import os
import random
import shutil

import torch
from safetensors.torch import load_file, save_file

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Two disjoint word sets for the separable task (class 0: animals, class 1: colours), then fillers.
CLASS_WORDS = [
    ["cat", "dog", "horse", "cow", "sheep", "goat", "mouse", "lion", "tiger", "bear", "wolf", "fox"],
    ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white", "grey", "gold"],
]
COMMON = ["the", "a", "an", "is", "was", "this", "that", "and", "or", "of", "in", "on", "with", "very", "photo",
          "picture", "text", "about", "animal", "colour", "color", "sentence", "review", "good", "bad", "movie"]
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
_CONS, _VOW = "bdfgklmnprstvz", "aeiou"
FILLERS = [c + v for c in _CONS for v in _VOW] + [c + v + c2 + v2 for c in _CONS[:8] for v in _VOW for c2, v2 in (("n", "a"), ("r", "o"), ("l", "i"))]


def vocab_words() -> list[str]:
    words = SPECIALS + LETTERS + COMMON + [w for ws in CLASS_WORDS for w in ws] + FILLERS
    seen, out = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def make_tokenizer(path: str):
    """A BERT WordPiece tokenizer built offline from a small vocab.txt, saved into ``path``."""
    from transformers import BertTokenizerFast

    os.makedirs(path, exist_ok=True)
    vocab_file = os.path.join(path, "vocab.txt")
    words = vocab_words()
    with open(vocab_file, "w") as f:
        f.write("\n".join(words) + "\n")
    try:  # transformers 5: the vocabulary is passed as a dict (vocab_file is only read by from_pretrained)
        tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    except TypeError:  # transformers 4
        tok = BertTokenizerFast(vocab_file=vocab_file)
    tok.save_pretrained(path)
    return tok


def make_tiny_bert(path, *, seed: int = 0, num_labels: int | None = None, hidden: int = 32, layers: int = 2,
                   tokenizer: bool = True) -> str:
    """A random-init BERT (``BertModel``, or ``BertForSequenceClassification`` with ``num_labels``)
    saved with ``save_pretrained(safe_serialization=True)`` plus its tokenizer. Returns the directory."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    path = str(path)
    os.makedirs(path, exist_ok=True)
    cfg = BertConfig(vocab_size=len(vocab_words()), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=max(1, hidden // 16), intermediate_size=2 * hidden, max_position_embeddings=160,
                     type_vocab_size=2, **({"num_labels": num_labels} if num_labels else {}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(cfg) if num_labels else BertModel(cfg)
        # random-init BERT has LayerNorm = identity and zero biases: make them non-trivial too
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer:
        make_tokenizer(path)
    return path


def perturb_checkpoint(src_dir, dst_dir, *, seed: int, scale: float = 0.02, keys=None) -> str:
    """Copy a model directory and add N(0, scale²) noise to its floating tensors (all, or ``keys``):
    a stand-in for a fine-tuned expert. Returns ``dst_dir``."""
    src_dir, dst_dir = str(src_dir), str(dst_dir)
    if os.path.exists(dst_dir):
        shutil.rmtree(dst_dir)
    shutil.copytree(src_dir, dst_dir)
    files = sorted(f for f in os.listdir(dst_dir) if f.endswith(".safetensors"))
    gen = torch.Generator().manual_seed(seed)
    wanted = set(keys) if keys is not None else None
    for name in files:
        path = os.path.join(dst_dir, name)
        tensors = load_file(path)
        for k in sorted(tensors):
            t = tensors[k]
            if t.is_floating_point() and (wanted is None or k in wanted):
                tensors[k] = (t + scale * torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype)).contiguous()
        save_file(tensors, path, metadata={"format": "pt"})
    return dst_dir


def finetune_zero_shot(model_dir, head: torch.Tensor, rows: list[dict], *, steps: int, seed: int, lr: float,
                       batch_size: int) -> None:
    """Really fine-tune a saved BertModel in place: a few AdamW steps of the whole encoder under a
    frozen zero-shot head (30·cos of the masked mean embedding with the class-prompt embeddings
    ``head``), the task-arithmetic recipe. Batches cycle through ``rows`` in order."""
    from transformers import AutoTokenizer, BertModel

    torch.manual_seed(seed)
    model = BertModel.from_pretrained(str(model_dir), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        batch = [rows[(step * batch_size + i) % len(rows)] for i in range(batch_size)]
        enc = tok([r["text"] for r in batch], return_tensors="pt", padding=True)
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        emb = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
        loss = torch.nn.functional.cross_entropy(30 * emb @ head.T, torch.tensor([r["label"] for r in batch]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(str(model_dir), safe_serialization=True)


def make_task_rows(n: int, *, seed: int = 0, label_names: list[str] | None = None, words_per_text=(2, 6),
                   text_field: str = "text", label_field: str = "label", by_name: bool = False) -> list[dict]:
    """A separable two-class text task: class c draws its words from ``CLASS_WORDS[c]`` only
    (plus common words). Labels are class indices, or names from ``label_names`` with ``by_name``."""
    names = label_names or ["animal", "colour"]
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        c = i % 2
        k = rng.randint(*words_per_text)
        words = [rng.choice(CLASS_WORDS[c]) for _ in range(k)]
        if rng.random() < 0.5:
            words.insert(rng.randrange(len(words) + 1), rng.choice(COMMON))
        rows.append({text_field: " ".join(words), label_field: names[c] if by_name else c})
    return rows


def write_jsonl(path, rows: list[dict]) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)
