"""Tied and untied LM heads between the base and an expert.

A model that ties its LM head to its token embeddings (``tie_word_embeddings``) saves no head
tensor; the same model fine-tuned and saved untied has one. Merging them key for key would fail
on a missing or extra key. The rule, applied per expert before the plan is built (the output
always keeps the base's tying, and the coverage list says what was done):

* **base untied, expert tied** (the expert has no head): the expert's head *is* its embedding
  table, so its head is read from it (the head's name points at the table's bytes).
* **base tied, expert untied** (the expert has an extra head): the head must be a copy of the
  expert's own embedding, which is what is merged. The engine compares the two, row block by row
  block, while it reads the embedding, and refuses the merge, naming the expert and both tensors,
  at the first row that differs (``Checkpoint.tied_duplicates``); equal, the copy is dropped.

The head and the table are found by role (``lm_head``; an ``embedding`` of the same shape), so
Llama-style (``lm_head`` / ``model.embed_tokens``), GPT-2 (``lm_head`` / ``transformer.wte``) and
GPT-NeoX (``embed_out`` / ``gpt_neox.embed_in``) names all work.
"""
from __future__ import annotations

from merging.io.checkpoint import Checkpoint
from merging.roles import Role, infer_role


def _heads(ckpt: Checkpoint) -> list[str]:
    return [k for k, m in ckpt.metas.items() if len(m.shape) == 2 and infer_role(k, m.shape).role == Role.lm_head]


def _table_for(ckpt: Checkpoint, shape: tuple[int, ...]) -> str | None:
    """The token-embedding table of ``ckpt`` with this shape, when there is exactly one."""
    tables = [k for k, m in ckpt.metas.items()
              if m.shape == shape and infer_role(k, m.shape).role == Role.embedding]
    return tables[0] if len(tables) == 1 else None


def reconcile_tied_heads(base: Checkpoint, expert: Checkpoint) -> dict[str, str]:
    """Apply the rule above to ``expert``; returns notes for the coverage list, by the key they concern."""
    notes: dict[str, str] = {}
    for head in _heads(base):
        if head in expert.metas:
            continue
        table = _table_for(expert, base.metas[head].shape)
        if table is not None and table in base.metas:
            expert.metas[head] = expert.metas[table]  # the table's bytes, read under the head's name
            notes[head] = f"{expert.label} ties {head} to {table} (no {head} saved): its head is read from {table}"
    for head in _heads(expert):
        if head in base.metas:
            continue
        table = _table_for(base, expert.metas[head].shape)
        if table is not None and table in expert.metas:
            expert.tied_duplicates[table] = expert.metas.pop(head)
            notes[table] = (f"{expert.label} saves an untied {head}; the base ties it to {table}: checked equal to the "
                            f"expert's {table} and dropped")
    return notes
