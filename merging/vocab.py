"""Experts whose vocabulary extends the base's: rows appended to the token-embedding table and the
LM head for tokens added in fine-tuning (chat special tokens, tool tokens). ``options.vocab``:

* unset: refused, naming the expert, the tensor, both row counts and the two policies;
* ``base``: the base's rows are merged and the output keeps the base's vocabulary; each expert's
  added rows are dropped and listed, with their tokens when its tokenizer names them;
* ``union``: the base's rows are merged; then every added token, by its string, gets one row
  appended, the mean of that row over the experts that added the token. The output's
  tokenizer.json (and tokenizer_config.json, added_tokens.json) gets the tokens at their new ids,
  and config.json its new ``vocab_size``.

Vocabulary tensors are those with the ``embedding`` or ``lm_head`` role whose rows are tokens.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from merging.errors import IncompatibleCheckpointsError, InputError
from merging.io.checkpoint import Checkpoint
from merging.io.safetensors_format import TensorMeta, rows_of
from merging.roles import Role, RoleInfo

VOCAB_ROLES = (Role.embedding, Role.lm_head)


@dataclass
class AddedToken:
    content: str
    entry: dict  # the token's tokenizer.json added_tokens entry (from the first expert that has it)
    rows: list[tuple[int, int]] = field(default_factory=list)  # (expert index, its row) for each expert that added it


@dataclass
class VocabUnion:
    """What ``union`` appends: the tokens in output order (ids base_rows, base_rows + 1, ...)."""
    base_rows: int
    tokens: list[AddedToken]

    @property
    def rows(self) -> int:
        return self.base_rows + len(self.tokens)

    def rows_of_key(self, key: str, extended: dict[str, set[int]]) -> list[list[tuple[int, int]]]:
        """For each appended token, the (expert, row) pairs that ``key`` holds (experts whose ``key``
        has the added rows)."""
        return [[(e, r) for e, r in t.rows if e in extended.get(key, set())] for t in self.tokens]


def added_rows(role: RoleInfo, base: TensorMeta, expert: TensorMeta) -> int | None:
    """How many rows ``expert`` appends to the vocabulary tensor ``base``, or None when the shapes
    differ otherwise (not a vocabulary tensor, other columns, or fewer rows)."""
    if role.role not in VOCAB_ROLES or len(base.shape) != 2 or expert.shape[1:] != base.shape[1:]:
        return None
    extra = expert.shape[0] - base.shape[0]
    return extra if extra > 0 else None


def refuse(key: str, expert: Checkpoint, expert_rows: int, base_rows: int) -> IncompatibleCheckpointsError:
    return IncompatibleCheckpointsError(
        f"tensor {key!r}: {expert.label} has {expert_rows} rows, base has {base_rows}: its vocabulary adds "
        f"{expert_rows - base_rows} token(s). Set options.vocab to 'base' (keep the base's {base_rows} tokens; the added "
        f"rows are dropped) or 'union' (append the added tokens, averaged over the experts that share them)",
        field="options.vocab")


def truncate(expert: Checkpoint, key: str, base_rows: int) -> None:
    """Read only the base's rows of ``key`` from ``expert`` from now on."""
    expert.metas[key] = rows_of(expert.metas[key], 0, base_rows)


def token_names(ckpt: Checkpoint, ids: range) -> dict[int, dict]:
    """The tokenizer.json entries of ``ids`` that ``ckpt``'s tokenizer names (added tokens, else the model's vocab)."""
    tok = ckpt.side_json("tokenizer.json", field="options.vocab")
    if tok is None:
        return {}
    found = {e["id"]: e for e in tok.get("added_tokens", []) if isinstance(e, dict) and e.get("id") in ids}
    vocab = (tok.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        for content, i in vocab.items():
            if i in ids and i not in found:
                found[i] = {"id": i, "content": content, "special": False}
    return found


def dropped_note(ckpt: Checkpoint, base_rows: int, expert_rows: int) -> str:
    names = token_names(ckpt, range(base_rows, expert_rows))
    listed = ", ".join(repr(names[i]["content"]) for i in sorted(names)[:20])
    more = f" and {len(names) - 20} more" if len(names) > 20 else ""
    tokens = f": {listed}{more}" if names else ""
    return f"{ckpt.label}: {expert_rows - base_rows} added row(s) {base_rows}..{expert_rows} dropped (options.vocab: base){tokens}"


def build_union(base: Checkpoint, experts: list[Checkpoint], base_rows: int, expert_rows: dict[int, int]) -> VocabUnion:
    """The tokens that ``union`` appends, from the experts' tokenizers: ``expert_rows`` maps each
    expert that adds rows to its row count. Every added row must be named by its tokenizer."""
    if base.side_files.get("tokenizer.json") is None:
        raise InputError("options.vocab: 'union' writes the added tokens into the base's tokenizer.json, and the base "
                         f"({base.uri}) has none", field="options.vocab")
    tokens: dict[str, AddedToken] = {}
    for e, rows in sorted(expert_rows.items()):
        ex = experts[e]
        names = token_names(ex, range(base_rows, rows))
        for r in range(base_rows, rows):
            if r not in names:
                raise InputError(f"options.vocab: 'union' needs the token of every added row: {ex.label}'s tokenizer.json "
                                 f"does not name row {r} (of {rows}; the base has {base_rows})", field="options.vocab")
            content = names[r]["content"]
            token = tokens.setdefault(content, AddedToken(content, dict(names[r])))
            token.rows.append((e, r))
    return VocabUnion(base_rows, list(tokens.values()))


def union_side_files(base: Checkpoint, union: VocabUnion) -> dict[str, bytes]:
    """The base's tokenizer and config files with the appended tokens (what the output gets instead)."""
    out: dict[str, bytes] = {}
    tok = base.side_json("tokenizer.json", field="options.vocab") or {}
    entries = [{**t.entry, "id": union.base_rows + i} for i, t in enumerate(union.tokens)]
    tok["added_tokens"] = [*tok.get("added_tokens", []), *entries]
    out["tokenizer.json"] = json.dumps(tok, ensure_ascii=False, indent=2).encode()
    for name, update in (("tokenizer_config.json", _tokenizer_config), ("added_tokens.json", _added_tokens_json),
                         ("config.json", _config)):
        data = base.side_json(name, field="options.vocab")
        if data is not None:
            out[name] = json.dumps(update(data, entries, union.rows), ensure_ascii=False, indent=2).encode()
    return out


def _tokenizer_config(data: dict, entries: list[dict], rows: int) -> dict:
    if isinstance(data.get("added_tokens_decoder"), dict):
        keys = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
        data["added_tokens_decoder"].update({str(e["id"]): {k: e[k] for k in keys if k in e} for e in entries})
    return data


def _added_tokens_json(data: dict, entries: list[dict], rows: int) -> dict:
    return {**data, **{e["content"]: e["id"] for e in entries}}


def _config(data: dict, entries: list[dict], rows: int) -> dict:
    if "vocab_size" in data:
        data["vocab_size"] = rows
    if isinstance(data.get("text_config"), dict) and "vocab_size" in data["text_config"]:
        data["text_config"]["vocab_size"] = rows
    return data
