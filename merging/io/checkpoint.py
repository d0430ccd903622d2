"""A checkpoint: its tensors' metadata (read from headers only) and per-tensor reads.

Formats: a single ``.safetensors`` file; a sharded checkpoint (``model.safetensors.index.json``);
a model directory holding either; PyTorch ``.bin``/``.pt``/``.pth`` (also ``pytorch_model.bin``
and its index), loaded only with ``weights_only=True``.

An http(s) directory cannot be listed: a URL ending in ``/`` or whose last component has no
checkpoint suffix is a model directory, probed for the files above (in that order) and for the
side files (``config.json``, tokenizer files) by HEAD requests.

Every error names the checkpoint's label (``base`` or ``expert 'name'``) and the URI at fault.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import pickle
import threading
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from merging.errors import CorruptCheckpointError, InputError, MergeError, UnreadableURIError, UnsafePickleError
from merging.io.safetensors_format import TensorMeta, header_length, parse_header, read_tensor, rows_of
from merging.io.sources import HTTP_SCHEMES, IOConfig, Location

_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux: fault the pages in at mmap(), in one call
# ``Checkpoint.view`` maps inputs read-only on purpose: torch warns that it cannot mark a tensor read-only.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

# Files copied from the base model directory into the output, when present: the config, the
# tokenizer with its special and added tokens, the chat template (transformers ≥ 4.43 keeps it in
# its own file), generation defaults, and sentence-transformers' files.
MODEL_SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "modules.json",
    "sentence_bert_config.json", "config_sentence_transformers.json",
)
# A model directory's weights, in order of preference.
MODEL_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
FILE_SUFFIXES = (".safetensors", ".json", *TORCH_SUFFIXES)
HEADER_PROBE = 1 << 16


@dataclass
class Checkpoint:
    uri: str
    label: str  # "base" or the expert's name: used in every error message
    format: str
    metas: dict[str, TensorMeta]
    side_files: dict[str, Location] = field(default_factory=dict)
    # An untied LM head saved beside the embedding table that the base ties it to: table key -> the
    # head's metadata, compared with the table as it is read (merging/tied_heads.py).
    tied_duplicates: dict[str, TensorMeta] = field(default_factory=dict)
    _files: dict[str, Location] = field(default_factory=dict)  # file key -> location
    _handles: dict = field(default_factory=dict)
    _torch_state: dict | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def keys(self) -> list[str]:
        return list(self.metas)

    def data_files(self) -> dict[str, Location]:
        return dict(self._files)

    def side_json(self, name: str, field: str | None = None) -> dict | None:
        """The side file ``name`` (config.json, tokenizer.json, ...) as a JSON object; None when the
        checkpoint has no such file or it holds another JSON value. Unreadable or invalid JSON is an
        ``InputError`` naming the checkpoint and the file (``field``: the spec field that needed it)."""
        loc = self.side_files.get(name)
        if loc is None:
            return None
        try:
            data = json.loads(loc.read_all())
        except (MergeError, ValueError, OSError):
            raise InputError(f"{self.label}: {name} is not readable JSON ({loc.uri})", field=field) from None
        return data if isinstance(data, dict) else None

    def read(self, key: str, out: torch.Tensor | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor ``key`` in fresh memory, or read into ``out`` (contiguous CPU, same dtype and
        shape). With ``rows = (start, stop)`` only those rows of its first dimension: one
        contiguous byte range of a safetensors file."""
        return self.read_meta(self.metas[key], out, rows)

    def read_meta(self, meta: TensorMeta, out: torch.Tensor | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """``read`` of the tensor that ``meta`` describes (a key's, or one set aside like ``tied_duplicates``)."""
        key = meta.key
        if rows is not None:
            meta = rows_of(meta, *rows)
        if self.format == "torch":
            src = self._torch(meta.file)[key].detach()
            if rows is not None:
                src = src[rows[0]:rows[1]]
            return src.clone().contiguous() if out is None else out.copy_(src)
        with self._lock:
            f = self._handle(meta.file)
            try:
                return read_tensor(f, meta, out)
            except CorruptCheckpointError as e:
                raise CorruptCheckpointError(f"{self.label} ({self._files[meta.file].uri}): {e}") from None
            except OSError as e:
                raise UnreadableURIError(f"{self.label}: cannot read tensor {key!r} from {self._files[meta.file].uri} ({e.strerror})") from None

    def view(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        """``read`` without a copy: a read-only tensor over the file's pages, mapped and faulted
        in now (MAP_POPULATE), so that the page cache is read in place instead of copied into
        fresh memory (at LLM scale the copy took a third of the reading thread). None for pickled
        checkpoints. The mapping lasts as long as the tensor; never write to it. A file truncated
        while mapped kills the process (SIGBUS) instead of raising; nothing is published then."""
        meta = self.metas[key]
        if self.format == "torch":
            return None
        if rows is not None:
            meta = rows_of(meta, *rows)
        if meta.nbytes == 0:
            return torch.empty(meta.shape, dtype=meta.dtype)
        with self._lock:
            f = self._handle(meta.file)
            aligned = meta.start - meta.start % mmap.ALLOCATIONGRANULARITY
            try:
                pages = mmap.mmap(f.fileno(), meta.start + meta.nbytes - aligned, flags=mmap.MAP_SHARED | _POPULATE,
                                  prot=mmap.PROT_READ, offset=aligned)
            except OSError as e:
                raise UnreadableURIError(f"{self.label}: cannot map tensor {key!r} from {self._files[meta.file].uri} ({e.strerror})") from None
        flat = torch.frombuffer(pages, dtype=meta.dtype, count=math.prod(meta.shape), offset=meta.start - aligned)
        return flat.reshape(meta.shape)

    def _handle(self, file_key: str):
        """The open data file ``file_key`` (opened on first use; call with ``_lock`` held)."""
        f = self._handles.get(file_key)
        if f is None:
            f = self._handles[file_key] = self._open_data(file_key)
        return f

    def _open_data(self, file_key: str):
        loc = self._files[file_key]
        path = _labelled(self.label, loc.local_path)
        try:
            size = os.path.getsize(path)
            need = max((m.start + m.nbytes for m in self.metas.values() if m.file == file_key), default=0)
            if size < need:
                raise CorruptCheckpointError(f"{self.label} ({loc.uri}): truncated file ({size} bytes, tensors need {need})")
            return open(path, "rb", buffering=0)
        except OSError as e:
            raise UnreadableURIError(f"{self.label}: cannot open {loc.uri} ({e.strerror})") from None

    def _torch(self, file_key: str) -> dict:
        with self._lock:
            if self._torch_state is None:
                self._torch_state = {}
            if file_key not in self._torch_state:
                loc = self._files[file_key]
                self._torch_state[file_key] = load_torch_weights(_labelled(self.label, loc.local_path), loc.uri, self.label)
            return self._torch_state[file_key]

    def close(self) -> None:
        with self._lock:
            for f in self._handles.values():
                f.close()
            self._handles.clear()
            self._torch_state = None


def _labelled(label: str, fn, *a, **kw):
    """Call ``fn``; prefix the checkpoint label to an ``UnreadableURIError`` it raises."""
    try:
        return fn(*a, **kw)
    except UnreadableURIError as e:
        if str(e).startswith(label):
            raise
        raise UnreadableURIError(f"{label}: {e.message}") from None


def _short(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_torch_weights(path: str, where: str, label: str) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)``: refuses any pickle that is not plain tensors and containers."""
    try:
        mmap = zipfile.is_zipfile(path)
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "weights only" not in text.lower() and "weights_only" not in text.lower():
            raise CorruptCheckpointError(f"{label} ({where}): not a valid PyTorch checkpoint (UnpicklingError: {_short(text)})") from None
        lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else "")
        raise UnsafePickleError(f"{label} ({where}): refused to unpickle: not a weights-only checkpoint ({_short(reason)})") from None
    except MemoryError:
        raise
    except Exception as e:  # truncated zip, garbage bytes (KeyError/IndexError from the legacy loader), EOF, ...
        raise CorruptCheckpointError(f"{label} ({where}): cannot load PyTorch checkpoint ({e.__class__.__name__}: {_short(str(e))})") from None
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model", "module"):
            inner = obj.get(wrapper)
            if isinstance(inner, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = inner
                break
    if not isinstance(obj, dict):
        raise InputError(f"{label} ({where}): PyTorch file holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise InputError(f"{label} ({where}): entry {bad[0]!r} is not a tensor")
    return obj


def _safetensors_header(loc: Location, file_key: str, label: str) -> dict[str, TensorMeta]:
    where = f"{label} ({loc.uri})"
    size = loc.size()
    prefix = loc.read_range(0, HEADER_PROBE)
    n = header_length(prefix, where, size)
    raw = prefix if len(prefix) >= 8 + n else loc.read_range(0, 8 + n)
    metas, _ = parse_header(raw, where, size)
    return {k: TensorMeta(m.key, m.dtype, m.shape, file_key, m.start, m.nbytes) for k, m in metas.items()}


def _check_shard_name(shard: object, index_loc: Location, label: str) -> str:
    if not isinstance(shard, str) or not shard or shard.startswith(("/", "\\")) or "://" in shard or "\\" in shard \
            or any(part in ("", ".", "..") for part in shard.split("/")):
        raise CorruptCheckpointError(f"{label}: {index_loc.uri} names an invalid shard file {shard!r}")
    return shard


def _from_index(index_loc: Location, label: str) -> tuple[dict[str, TensorMeta], dict[str, Location], str]:
    try:
        index = json.loads(index_loc.read_all())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except UnreadableURIError:
        raise
    except (ValueError, KeyError, TypeError):
        raise CorruptCheckpointError(f"{label}: {index_loc.uri} is not a valid index (needs a 'weight_map' object)") from None
    if not weight_map:
        raise InputError(f"{label}: {index_loc.uri} lists no tensors")
    files: dict[str, Location] = {}
    for shard in sorted({_check_shard_name(s, index_loc, label) for s in weight_map.values()}):
        files[shard] = index_loc.parent().child(shard)
    if all(f.endswith(TORCH_SUFFIXES) for f in files):
        metas = _torch_metas(files, label)
        fmt = "torch"
    elif any(f.endswith(TORCH_SUFFIXES) for f in files):
        raise CorruptCheckpointError(f"{label}: {index_loc.uri} mixes PyTorch and safetensors shards")
    else:
        metas = {}
        for shard, loc in files.items():
            for key, m in _safetensors_header(loc, shard, label).items():
                if weight_map.get(key) == shard:  # as HF loaders: the index says where each tensor lives
                    metas[key] = m
        fmt = "safetensors-sharded"
    missing = sorted(set(weight_map) - set(metas))
    if missing:
        raise CorruptCheckpointError(f"{label}: index {index_loc.uri} lists tensor {missing[0]!r} but its shard "
                                     f"{weight_map[missing[0]]} does not hold it")
    if fmt == "torch":
        metas = {k: m for k, m in metas.items() if weight_map.get(k) == m.file}
    return metas, files, fmt


def _torch_metas(files: dict[str, Location], label: str) -> dict[str, TensorMeta]:
    metas = {}
    for name, loc in files.items():
        for key, t in load_torch_weights(_labelled(label, loc.local_path), loc.uri, label).items():
            if key in metas:
                raise CorruptCheckpointError(f"{label}: tensor {key!r} appears in two PyTorch files")
            metas[key] = TensorMeta(key, t.dtype, tuple(t.shape), name, 0, t.numel() * t.element_size())
    return metas


def _open_file(loc: Location, label: str) -> tuple[dict[str, TensorMeta], dict[str, Location], str]:
    name = loc.name
    if name.endswith(".index.json"):
        return _from_index(loc, label)
    if name.endswith(".safetensors"):
        return _safetensors_header(loc, name, label), {name: loc}, "safetensors"
    if name.endswith(TORCH_SUFFIXES):
        files = {name: loc}
        return _torch_metas(files, label), files, "torch"
    raise InputError(f"{label}: unsupported checkpoint format {loc.uri} "
                     "(use .safetensors, an index.json, .bin/.pt or a model directory)")


def _probe(locs: list[Location]) -> list[bool]:
    """``exists()`` for several remote locations at once (HEAD requests)."""
    if len(locs) <= 1:
        return [loc.exists() for loc in locs]
    with ThreadPoolExecutor(max_workers=min(8, len(locs)), thread_name_prefix="probe") as pool:
        return list(pool.map(lambda loc: loc.exists(), locs))


def _open_dir(loc: Location, label: str):
    if loc.listable:
        names = set(loc.listdir())
        weights = next((n for n in MODEL_WEIGHT_FILES if n in names), None)
        if weights is None:
            st = sorted(n for n in names if n.endswith(".safetensors"))
            if len(st) != 1:
                raise InputError(f"{label}: {loc.uri} holds no model.safetensors, index or pytorch_model.bin"
                                 + (f" (found {len(st)} .safetensors files)" if st else ""))
            weights = st[0]
        side_names = [n for n in MODEL_SIDE_FILES if n in names]
    else:
        # An http(s) "directory" cannot be listed: probe for the weight files, in order of preference.
        weights = None
        for n in MODEL_WEIGHT_FILES:
            if loc.child(n).exists():
                weights = n
                break
        if weights is None:
            raise UnreadableURIError(f"{label}: found no checkpoint at {loc.uri} (probed {', '.join(MODEL_WEIGHT_FILES)}; "
                                     "give the URL of a .safetensors file or an index to skip probing)")
        candidates = [loc.child(n) for n in MODEL_SIDE_FILES]
        side_names = [n for n, ok in zip(MODEL_SIDE_FILES, _probe(candidates)) if ok]
    metas, files, fmt = _open_file(loc.child(weights), label)
    return metas, files, fmt, {n: loc.child(n) for n in side_names}


def _is_dir(loc: Location) -> bool:
    if loc.scheme in HTTP_SCHEMES:
        name = loc.name
        return loc.uri.split("?", 1)[0].split("#", 1)[0].endswith("/") or not name.endswith(FILE_SUFFIXES)
    if not loc.exists():
        raise UnreadableURIError(f"{loc.uri}: not found")
    return loc.is_dir()


def open_checkpoint(uri: str | os.PathLike, label: str, cfg: IOConfig | None = None,
                    revision: str | None = None) -> Checkpoint:
    """Open a checkpoint by URI or local path (``str`` or ``pathlib.Path``), reading headers only
    (PyTorch files are loaded, weights-only).

    ``revision`` pins an ``hf://`` repo (as ``@revision`` in the URI would).
    """
    uri = os.fspath(uri)
    cfg = cfg or IOConfig()
    try:
        if revision and not uri.lower().startswith("hf://"):
            raise InputError(f"{label}: revision {revision!r} is only supported for hf:// URIs, not {uri}")
        loc = Location(uri, cfg, revision)
        if _is_dir(loc):
            metas, files, fmt, side = _open_dir(loc, label)
        else:
            (metas, files, fmt), side = _open_file(loc, label), {}
            if loc.name in MODEL_WEIGHT_FILES:  # a standard weight file of a model directory: its config/tokenizer too
                parent = loc.parent()
                if parent.listable:
                    names = set(parent.listdir())
                    side = {n: parent.child(n) for n in MODEL_SIDE_FILES if n in names}
                else:
                    candidates = [parent.child(n) for n in MODEL_SIDE_FILES]
                    side = {c.name: c for c, ok in zip(candidates, _probe(candidates)) if ok}
    except UnreadableURIError as e:
        if str(e).startswith(label):
            raise
        raise UnreadableURIError(f"{label}: cannot read {e.message}") from None
    except MergeError:
        raise
    except OSError as e:  # anything the I/O layer did not already name
        raise UnreadableURIError(f"{label}: cannot read {uri} ({e.__class__.__name__}: {e})") from None
    if not metas:
        raise InputError(f"{label}: {uri} holds no tensors")
    return Checkpoint(uri=uri, label=label, format=fmt, metas=metas, side_files=side, _files=files)


def iter_tensors(uri: str | os.PathLike, label: str, cfg: IOConfig | None = None, revision: str | None = None,
                 keys: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` for every tensor of a checkpoint (or for ``keys``), one at a time in fresh
    memory; the checkpoint is closed when the iteration ends."""
    ck = open_checkpoint(uri, label, cfg, revision)
    try:
        for key in ck.keys() if keys is None else keys:
            yield key, ck.read(key)
    finally:
        ck.close()


def read_tensors(uri: str | os.PathLike, label: str, cfg: IOConfig | None = None,
                 revision: str | None = None) -> dict[str, torch.Tensor]:
    """A whole checkpoint in memory, key -> tensor (evaluation runs whole models)."""
    return dict(iter_tensors(uri, label, cfg, revision))
