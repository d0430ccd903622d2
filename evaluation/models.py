"""Checkpoints run as models: a Hugging Face text-model adapter and an adapter registry.

``local_model_dir`` turns a checkpoint URI into a local directory (config, tokenizer files,
weights); ``TextModel.load`` builds the architecture named in its ``config.json`` and fills it
with the checkpoint's tensors read by the merging library's own reader, so that the model's
settable tensors are addressed by exactly the checkpoint's keys (``state_keys``/``set_state``:
the keys a merge produces). Everything runs offline (``local_files_only=True``), in eval mode,
batched and under ``torch.inference_mode``.

``load_model`` picks an adapter: ``hf_transformers`` (this module's ``TextModel``) or a custom
entry point ``python:package.module:function`` called as ``function(model_dir, device=...)``
(the door for image models and other modalities).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from evaluation.errors import EvaluationError, ModelLoadError
from merging.errors import MergeError
from merging.io.checkpoint import MODEL_WEIGHT_FILES, open_checkpoint
from merging.io.sources import IOConfig, split_scheme

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


# ----------------------------------------------------------------------------------------
# URIs -> local model directories


def local_model_dir(uri: str, io: IOConfig | None = None, revision: str | None = None) -> str:
    """A local directory holding ``config.json``, the tokenizer files and the weights of ``uri``.

    A local path or ``file://`` URI is returned as it is (a standard weight file such as
    ``.../model.safetensors`` gives its directory). ``s3://``, ``http(s)://`` and ``hf://`` are
    opened with ``merging.io.checkpoint.open_checkpoint``; the side files and weight files are
    downloaded into the merging cache once and symlinked into ``<cache>/models/<digest>/``
    (the digest covers the URI, the revision and each file's cached version).
    """
    scheme, rest = split_scheme(uri)
    if scheme in ("", "file"):
        if revision:
            raise ModelLoadError(f"{uri}: a revision ({revision!r}) applies to hf:// URIs only")
        path = os.path.abspath(os.path.expanduser(rest))
        if os.path.isdir(path):
            return path
        if os.path.isfile(path):
            if os.path.basename(path) in MODEL_WEIGHT_FILES:
                return os.path.dirname(path)
            raise ModelLoadError(f"{uri}: is a file; give the model directory (config.json, tokenizer files and weights)")
        raise ModelLoadError(f"{uri}: not found")

    cfg = io or IOConfig()
    try:
        ckpt = open_checkpoint(uri, "model", cfg, revision)
    except MergeError as e:
        raise ModelLoadError(f"{uri}: {e}") from None
    try:
        if "config.json" not in ckpt.side_files:
            raise ModelLoadError(f"{uri}: no config.json beside the weights (needed to build the model)")
        files: dict[str, str] = {name: loc.local_path() for name, loc in ckpt.side_files.items()}
        data = {name: loc.local_path() for name, loc in ckpt.data_files().items()}
    except ModelLoadError:
        raise
    except MergeError as e:
        raise ModelLoadError(f"{uri}: {e}") from None
    finally:
        ckpt.close()

    index: dict[str, Any] | None = None
    if ckpt.format == "safetensors":
        (path,) = data.values()
        files["model.safetensors"] = path
    elif ckpt.format == "torch" and len(data) == 1:
        (path,) = data.values()
        files["pytorch_model.bin"] = path
    else:  # sharded: keep the shard names, write an index that maps every key to its shard
        files.update(data)
        index = {"metadata": {"source": uri}, "weight_map": {k: m.file for k, m in ckpt.metas.items()}}
        index_name = "pytorch_model.bin.index.json" if ckpt.format == "torch" else "model.safetensors.index.json"

    tag = json.dumps([uri, revision, sorted(files.items())])
    digest = hashlib.sha256(tag.encode()).hexdigest()
    target = os.path.join(cfg.cache_dir, "models", digest[:2], digest)
    if os.path.isfile(os.path.join(target, ".complete")):
        return target
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=".build-")
    except OSError as e:
        raise ModelLoadError(f"{uri}: cannot create the model cache directory {parent} ({e.strerror})") from None
    try:
        for name, path in files.items():
            dst = os.path.join(tmp, name)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.symlink(os.path.abspath(path), dst)
        if index is not None:
            with open(os.path.join(tmp, index_name), "w") as f:
                json.dump(index, f)
        open(os.path.join(tmp, ".complete"), "w").close()
        try:
            os.replace(tmp, target)
        except OSError:  # another process built it meanwhile (or a stale partial one is there)
            if not os.path.isfile(os.path.join(target, ".complete")):
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
    except OSError as e:
        raise ModelLoadError(f"{uri}: cannot build the model directory {target} ({e.strerror})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------
# devices and construction helpers


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` = CUDA when torch sees a GPU, else CPU; ``cuda`` without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"unknown device {device!r} (use auto, cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but torch sees no CUDA GPU")
    return dev


def _linear_types() -> tuple[type, ...]:
    types: list[type] = [torch.nn.Linear]
    with contextlib.suppress(ImportError, AttributeError):
        # lazy, as every transformers import here: transformers takes half a second to import and only
        # running a model needs it (``import evaluation.models`` stays light for the CLI and the API)
        from transformers.pytorch_utils import Conv1D  # GPT-2 style (in, out) linears
        types.append(Conv1D)
    return tuple(types)


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ----------------------------------------------------------------------------------------
# the adapter


class TextModel:
    """A Hugging Face text model addressed by its checkpoint's tensor keys."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, device: torch.device, *, name: str,
                 key_map: dict[str, str]):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.name = name  # the model directory, for messages
        self.config = getattr(model, "config", None)
        self.architecture = type(model).__name__
        self._key_map = dict(key_map)  # checkpoint key -> model tensor name
        self._model_to_ckpt = {v: k for k, v in key_map.items()}
        self._targets: dict[str, torch.Tensor] = {}
        self._refresh_targets()
        params = inspect.signature(model.forward).parameters
        self._accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self._forward_args = set(params)
        # longest input the model takes: the tokenizer's model_max_length when it is set, else the position table
        limits = [int(getattr(tokenizer, "model_max_length", 0) or 0), int(getattr(self.config, "max_position_embeddings", 0) or 0)]
        limits = [n for n in limits if 2 <= n < 1_000_000]
        self.max_positions = min(limits) if limits else 1_000_000

    # -- loading -------------------------------------------------------------------------

    @classmethod
    def load(cls, model_dir: str, *, device: str = "auto", tokenizer_dir: str | None = None,
             dtype: str = "auto") -> "TextModel":
        """Build the model in ``model_dir`` offline and load its weights.

        The class is ``config.json``'s ``architectures[0]`` from transformers (``AutoModel`` when
        absent or unknown). ``dtype``: ``auto`` = float32 on CPU and the checkpoint's floating
        dtype on CUDA, or one of float32/float16/bfloat16/float64.
        """
        import transformers  # lazy: see _linear_types

        if not os.path.isdir(model_dir):
            raise ModelLoadError(f"{model_dir}: not a model directory")
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise ModelLoadError(f"{model_dir}: no config.json (the model's architecture); "
                                 "a model directory needs config.json, tokenizer files and the weights")
        dev = resolve_device(device)
        try:
            config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - any parse/unknown-model error names the file
            raise ModelLoadError(f"{model_dir}/config.json: cannot build a config ({_short(e)})") from None
        archs = list(getattr(config, "architectures", None) or [])
        model_cls = getattr(transformers, archs[0], None) if archs else None
        if model_cls is not None and not (isinstance(model_cls, type) and issubclass(model_cls, torch.nn.Module)):
            model_cls = None
        try:
            # A normal construction (random init included, ~1 s for BERT-base on 2 cores): skipping the init would
            # leave any buffer that a model fills in _init_weights uninitialised. Every weight is then overwritten.
            if model_cls is not None:
                model = model_cls._from_config(config)
            else:
                model = transformers.AutoModel.from_config(config)
        except Exception as e:  # noqa: BLE001
            what = archs[0] if model_cls is not None else f"AutoModel for model_type {getattr(config, 'model_type', '?')!r}"
            raise ModelLoadError(f"{model_dir}: cannot build {what} from config.json ({_short(e)})") from None

        try:
            ckpt = open_checkpoint(model_dir, "model")
        except MergeError as e:
            raise ModelLoadError(f"{model_dir}: {e}") from None
        try:
            key_map = _match_keys(model, list(ckpt.metas), model_dir)
            named = _named_tensors(model)
            with torch.no_grad():
                for key, target_name in key_map.items():
                    target = named[target_name]
                    meta = ckpt.metas[key]
                    if tuple(meta.shape) != tuple(target.shape):
                        raise ModelLoadError(f"{model_dir}: tensor {key!r} has shape {list(meta.shape)} in the checkpoint, "
                                             f"{type(model).__name__} expects {list(target.shape)}")
                    try:
                        target.copy_(ckpt.read(key))
                    except MergeError as e:
                        raise ModelLoadError(f"{model_dir}: {e}") from None
            float_dtypes = [m.dtype for m in ckpt.metas.values() if m.dtype.is_floating_point]
        finally:
            ckpt.close()

        if dtype in (None, "", "auto"):
            torch_dtype = torch.float32
            if dev.type == "cuda" and float_dtypes:
                torch_dtype = max(set(float_dtypes), key=float_dtypes.count)
                if torch_dtype not in DTYPES.values():
                    torch_dtype = torch.float32
        elif dtype in DTYPES:
            torch_dtype = DTYPES[dtype]
        else:
            raise ModelLoadError(f"unknown dtype {dtype!r} (use auto, {', '.join(DTYPES)})")
        model.to(device=dev, dtype=torch_dtype)
        model.eval()
        model.requires_grad_(False)
        tokenizer = _load_tokenizer(tokenizer_dir or model_dir)
        return cls(model, tokenizer, dev, name=model_dir, key_map=key_map)

    def _refresh_targets(self) -> None:
        named = _named_tensors(self.model)
        self._targets = {k: named[v] for k, v in self._key_map.items()}

    # -- state -----------------------------------------------------------------------------

    def state_keys(self) -> list[str]:
        """The checkpoint keys of every parameter and buffer ``set_state`` can set."""
        return list(self._key_map)

    def set_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy ``state`` in by checkpoint key (cast to the model's dtype and device), in place."""
        for key, value in state.items():
            target = self._targets.get(key)
            if target is None:
                raise ModelLoadError(f"{self.name}: set_state: {key!r} is not a tensor of this model "
                                     f"({self.architecture}, {len(self._targets)} keys)")
            if tuple(value.shape) != tuple(target.shape):
                raise ModelLoadError(f"{self.name}: set_state: {key!r} has shape {list(value.shape)}, "
                                     f"the model's tensor has {list(target.shape)}")
        with torch.no_grad():
            for key, value in state.items():
                self._targets[key].copy_(value, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def get_state(self, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """CPU copies of the model's tensors by checkpoint key (all of them by default)."""
        out = {}
        for key in (self.state_keys() if keys is None else keys):
            if key not in self._targets:
                raise ModelLoadError(f"{self.name}: {key!r} is not a tensor of this model")
            out[key] = self._targets[key].detach().to("cpu", copy=True)
        return out

    def linear_layers(self) -> dict[str, torch.nn.Module]:
        """Weight checkpoint key (``...dense.weight``) -> ``nn.Linear`` module (also GPT-2 ``Conv1D``)."""
        out: dict[str, torch.nn.Module] = {}
        types = _linear_types()
        for name, module in self.model.named_modules():
            if isinstance(module, types):
                key = self._model_to_ckpt.get(f"{name}.weight" if name else "weight")
                if key is not None:
                    out[key] = module
        return out

    # -- running -------------------------------------------------------------------------

    def iter_batches(self, texts: Sequence[str], batch_size: int, max_length: int
                     ) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """(indices into ``texts``, tokenised batch on the device), shortest texts first."""
        if batch_size < 1:
            raise EvaluationError(f"batch_size must be at least 1, got {batch_size}")
        if max_length < 2:
            raise EvaluationError(f"max_length must be at least 2, got {max_length}")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise EvaluationError(f"text {i + 1} is a {type(t).__name__}, not a string")
        max_length = min(max_length, self.max_positions)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                                 return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in enc.items()
                     if self._accepts_any or k in self._forward_args}
            if "attention_mask" not in batch:
                raise EvaluationError(f"{self.name}: the tokenizer gives no attention_mask")
            yield idx, batch

    def forward(self, batch: Mapping[str, torch.Tensor]) -> Any:
        return self.model(**batch, output_hidden_states=True, return_dict=True)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], *, batch_size: int = 32, max_length: int = 128) -> torch.Tensor:
        """(N, d) float32 CPU: L2-normalised mean of the last hidden state over the real tokens."""
        rows: list[torch.Tensor | None] = [None] * len(texts)
        for idx, batch in self.iter_batches(texts, batch_size, max_length):
            out = self.forward(batch)
            hidden = out.hidden_states[-1] if getattr(out, "hidden_states", None) else out.last_hidden_state
            h = hidden.float()
            mask = batch["attention_mask"].to(h.dtype).unsqueeze(-1)
            mean = (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            emb = torch.nn.functional.normalize(mean, dim=-1).cpu()
            for j, i in enumerate(idx):
                rows[i] = emb[j]
        if not rows:
            d = getattr(self.config, "hidden_size", 0) or 0
            return torch.empty(0, d, dtype=torch.float32)
        return torch.stack(rows)  # type: ignore[arg-type]

    @torch.inference_mode()
    def classify(self, texts: Sequence[str], *, batch_size: int = 32, max_length: int = 128) -> torch.Tensor:
        """(N, num_labels) float32 CPU logits of the sequence-classification head."""
        if not texts:
            if "ForSequenceClassification" not in self.architecture:
                raise ModelLoadError(f"{self.name}: {self.architecture} has no sequence-classification head")
            return torch.empty(0, int(getattr(self.config, "num_labels", 0)), dtype=torch.float32)
        rows: list[torch.Tensor | None] = [None] * len(texts)
        for idx, batch in self.iter_batches(texts, batch_size, max_length):
            out = self.forward(batch)
            logits = getattr(out, "logits", None)
            if logits is None or logits.ndim != 2:
                raise ModelLoadError(f"{self.name}: {self.architecture} has no sequence-classification head "
                                     "(its output has no (batch, num_labels) logits)")
            logits = logits.float().cpu()
            for j, i in enumerate(idx):
                rows[i] = logits[j]
        return torch.stack(rows)  # type: ignore[arg-type]


def _named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not, tied aliases included) by name."""
    named: dict[str, torch.Tensor] = dict(model.named_buffers(remove_duplicate=False))
    named.update(model.named_parameters(remove_duplicate=False))
    return named


def _ignored(model: torch.nn.Module, attr: str, key: str) -> bool:
    patterns = getattr(model, attr, None) or []
    return any(re.search(p, key) for p in patterns)


def _match_keys(model: torch.nn.Module, ckpt_keys: list[str], where: str) -> dict[str, str]:
    """checkpoint key -> model tensor name; ties weights the checkpoint leaves out; raises naming
    the first checkpoint key without a model tensor, or the first model tensor left unloaded."""
    named = _named_tensors(model)
    prefix = getattr(model, "base_model_prefix", "") or ""
    arch = type(model).__name__
    key_map: dict[str, str] = {}
    unexpected = []
    for key in ckpt_keys:
        if key in named:
            key_map[key] = key
        elif prefix and f"{prefix}.{key}" in named:
            key_map[key] = f"{prefix}.{key}"
        elif prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in named:
            key_map[key] = key[len(prefix) + 1:]
        elif not _ignored(model, "_keys_to_ignore_on_load_unexpected", key):
            unexpected.append(key)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ModelLoadError(f"{where}: checkpoint tensor {unexpected[0]!r}{more} is not a parameter or buffer of "
                             f"{arch} (config.json architectures); the checkpoint's keys do not match the model")

    def _missing() -> list[str]:
        named_now = _named_tensors(model)
        covered = {id(named_now[n]) for n in key_map.values()}
        return [n for n, t in model.state_dict(keep_vars=True).items()
                if id(t) not in covered and not _ignored(model, "_keys_to_ignore_on_load_missing", n)]

    missing = _missing()
    if missing and hasattr(model, "tie_weights"):  # tied weights (LM heads) are saved once: tie, as from_pretrained does
        try:
            model.tie_weights(missing_keys=set(missing))  # transformers 5: symmetric tying
        except TypeError:
            model.tie_weights()
        missing = _missing()
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"{where}: the checkpoint has no tensor for {arch}'s {missing[0]!r}{more}; "
                             "the checkpoint's keys do not match the model")
    return key_map


def _load_tokenizer(tokenizer_dir: str):
    import transformers  # lazy: see _linear_types

    if not os.path.isdir(tokenizer_dir) or not any(os.path.isfile(os.path.join(tokenizer_dir, n)) for n in TOKENIZER_FILES):
        raise ModelLoadError(f"{tokenizer_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                             "give a tokenizer directory (e.g. the base model's)")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{tokenizer_dir}: cannot load the tokenizer ({_short(e)})") from None
    if getattr(tok, "pad_token", None) is None:
        fallback = getattr(tok, "eos_token", None) or getattr(tok, "unk_token", None)
        if fallback is None:
            raise ModelLoadError(f"{tokenizer_dir}: the tokenizer has no padding token (nor eos/unk to pad with)")
        tok.pad_token = fallback
    return tok


# ----------------------------------------------------------------------------------------
# adapter registry

ADAPTERS: dict[str, Callable[..., Any]] = {"hf_transformers": TextModel.load}


def load_model(model_dir: str, *, adapter: str = "hf_transformers", device: str = "auto",
               tokenizer_dir: str | None = None):
    """Load ``model_dir`` with an adapter.

    ``hf_transformers``: ``TextModel.load``. ``python:package.module:function``: a custom entry point,
    called as ``function(model_dir, device=device)`` (plus ``tokenizer_dir=`` when one is given).
    """
    if adapter in ADAPTERS:
        return ADAPTERS[adapter](model_dir, device=device, tokenizer_dir=tokenizer_dir)
    if adapter.startswith("python:"):
        target = adapter[len("python:"):]
        module_name, sep, attr = target.partition(":")
        if not sep or not module_name or not attr:
            raise ModelLoadError(f"model adapter {adapter!r}: use 'python:package.module:function'")
        try:
            fn: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                fn = getattr(fn, part)
        except Exception as e:  # noqa: BLE001 - ImportError, AttributeError, or an error while importing
            raise ModelLoadError(f"model adapter {adapter!r}: cannot import it ({_short(e)})") from None
        if not callable(fn):
            raise ModelLoadError(f"model adapter {adapter!r}: {attr} is not callable")
        kwargs: dict[str, Any] = {"device": device}
        if tokenizer_dir is not None:
            kwargs["tokenizer_dir"] = tokenizer_dir
        return fn(model_dir, **kwargs)
    raise ModelLoadError(f"unknown model adapter {adapter!r} (use {', '.join(map(repr, ADAPTERS))} "
                         "or 'python:package.module:function')")


__all__ = ["local_model_dir", "TextModel", "load_model", "resolve_device", "ADAPTERS"]
