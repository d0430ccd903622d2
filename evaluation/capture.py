"""Calibration statistics for ESM: the Gram matrix XᵀX of every linear layer's inputs.

ESM (ALGORITHMS.md §4.1) needs, per expert and per ESD layer, the inputs X_t that layer sees
in the expert's own fine-tuned model, one row per token. It uses them only through XᵀX and
the token count N, so this module runs the model on calibration texts with forward hooks on
every ``nn.Linear`` and accumulates XᵀX in float64, leaving out padding tokens. The file it
writes is the one ``merging/calibration.py`` reads: ``<weight key>:gram`` (d_in × d_in,
float64) and ``<weight key>:count`` (int64, shape (1,)).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Sequence

import torch
from safetensors.torch import save_file

from evaluation.errors import EvaluationError
from merging.io.sources import IOConfig, Location, copy_local_to, split_scheme

CALIBRATION_FORMAT = "submerge-calibration-gram-v1"


def capture_gram(model, texts: Sequence[str], *, batch_size: int = 8, max_length: int = 128) -> dict[str, torch.Tensor]:
    """``{"<key>:gram": XᵀX (float64, d_in × d_in), "<key>:count": tensor([N])}`` for every linear layer.

    Rows are tokens. A hook input whose leading dimensions equal the batch's attention mask
    keeps the real tokens only; any other input (a pooler's (B, d), already-unpadded tokens)
    counts every row. Layers that the forward pass never calls are left out.
    """
    if not texts:
        raise EvaluationError("calibration needs at least one text")
    layers = model.linear_layers()
    if not layers:
        raise EvaluationError(f"{getattr(model, 'name', 'model')}: the model has no linear layers to calibrate")
    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    # last: (input, its version, its Gram, its rows) so that layers fed the same tensor (q/k/v) share one product
    state: dict = {"mask": None, "last": None}

    def make_hook(key: str):
        def hook(module, inputs, output):
            if not inputs or not isinstance(inputs[0], torch.Tensor):
                return
            x = inputs[0]
            last = state["last"]
            if last is not None and last[0] is x and last[1] == x._version:
                gram, n = last[2], last[3]
            else:
                mask = state["mask"]
                if mask is not None and x.dim() >= 2 and tuple(x.shape[:-1]) == tuple(mask.shape):
                    rows = x[mask]
                else:
                    rows = x.reshape(-1, x.shape[-1])
                rows = rows.to(torch.float64)
                gram, n = rows.mT @ rows, int(rows.shape[0])
                state["last"] = (x, x._version, gram, n)
            acc = grams.get(key)
            if acc is None:
                grams[key] = gram.clone()
                counts[key] = n
            else:
                acc.add_(gram)
                counts[key] += n
        return hook

    handles = [module.register_forward_hook(make_hook(key)) for key, module in layers.items()]
    try:
        with torch.no_grad():  # not inference_mode: the shared-input check needs version counters
            for _, batch in model.iter_batches(texts, batch_size, max_length):
                state["mask"] = batch["attention_mask"].bool()
                state["last"] = None
                model.forward(batch)
    finally:
        for h in handles:
            h.remove()
        state.clear()
    out: dict[str, torch.Tensor] = {}
    for key in layers:
        if key in grams:
            out[f"{key}:gram"] = grams[key].cpu()
            out[f"{key}:count"] = torch.tensor([counts[key]], dtype=torch.int64)
    return out


def calibration_summary(stats: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(number of layers, largest token count) of a statistics dict."""
    counts = [int(v.reshape(-1)[0]) for k, v in stats.items() if k.endswith(":count")]
    return len(counts), max(counts, default=0)


def save_calibration(stats: dict[str, torch.Tensor], path: str) -> None:
    """Write ``stats`` as safetensors, atomically (a temporary file in the same directory, then
    ``os.replace``). ``s3://`` destinations are written locally first, then uploaded."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in stats.items()}
    metadata = {"format": "pt", "submerge": CALIBRATION_FORMAT}
    scheme, rest = split_scheme(path)
    if scheme not in ("", "file"):
        dest = Location(path, IOConfig())
        with tempfile.TemporaryDirectory(prefix="submerge-calib-") as tmpdir:
            local = os.path.join(tmpdir, "calibration.safetensors")
            save_file(tensors, local, metadata=metadata)
            copy_local_to(local, dest)
        return
    target = os.path.abspath(os.path.expanduser(rest))
    directory = os.path.dirname(target)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".calibration-", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def calibration_cache_key(checkpoint_sha256: str, data_sha256: str, samples: int, max_length: int) -> str:
    """Hex digest naming one calibration run: same checkpoint, data, sample count and length → same key."""
    tag = "\0".join([CALIBRATION_FORMAT, checkpoint_sha256, data_sha256, str(int(samples)), str(int(max_length))])
    return hashlib.sha256(tag.encode()).hexdigest()


__all__ = ["capture_gram", "save_calibration", "calibration_cache_key", "calibration_summary"]
