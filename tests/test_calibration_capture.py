"""evaluation.capture: Gram matrices of every linear layer's inputs, checked against inputs
recomputed with our own hooks, and ESM given the Grams == ESM given the raw inputs."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import merging
from evaluation.capture import calibration_cache_key, capture_gram, save_calibration
from evaluation.models import TextModel
from merging.calibration import _open_file
from merging.io.sources import IOConfig
from service.cli import main as submerge
from tests.tiny_bert import make_task_rows, make_tiny_bert, perturb_checkpoint, write_jsonl

TEXTS = [r["text"] for r in make_task_rows(12, seed=5)] + ["", "the very red cat is a very brown bear and a wolf"]


def raw_inputs(model: TextModel, texts) -> dict[str, torch.Tensor]:
    """Each linear layer's inputs, one row per token, from un-padded one-text runs (float32)."""
    rows: dict[str, list[torch.Tensor]] = {}
    handles = []
    for key, module in model.linear_layers().items():
        def hook(mod, inputs, output, key=key):
            x = inputs[0]
            rows.setdefault(key, []).append(x.detach().reshape(-1, x.shape[-1]).clone())
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for t in texts:
                enc = model.tokenizer([t], return_tensors="pt", truncation=True, max_length=128)
                model.model(**enc)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in rows.items()}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    base = make_tiny_bert(root / "base", seed=0)
    experts = [perturb_checkpoint(base, root / f"e{t}", seed=10 + t, scale=0.05) for t in range(2)]
    return root, base, experts


@pytest.mark.parametrize("num_labels", [None, 2])
def test_gram_equals_inputs_recomputed_without_padding(tmp_path, num_labels):
    d = make_tiny_bert(tmp_path / "m", seed=1, num_labels=num_labels)
    model = TextModel.load(d, device="cpu")
    stats = capture_gram(model, TEXTS, batch_size=4)  # batches of mixed lengths: padding inside
    raw = raw_inputs(model, TEXTS)
    n_tokens = sum(len(model.tokenizer(t)["input_ids"]) for t in TEXTS)
    assert set(stats) == {f"{k}:{s}" for k in model.linear_layers() for s in ("gram", "count")}
    for key, x in raw.items():
        gram, count = stats[f"{key}:gram"], stats[f"{key}:count"]
        assert gram.dtype == torch.float64 and count.dtype == torch.int64 and count.shape == (1,)
        x = x.double()
        torch.testing.assert_close(gram, x.mT @ x, rtol=1e-5, atol=1e-5)
        assert int(count) == x.shape[0]
        pooled = "pooler" in key or "classifier" in key
        assert int(count) == (len(TEXTS) if pooled else n_tokens)  # padding excluded; (B, d) inputs: one row per text


def test_esm_from_grams_equals_esm_from_raw_inputs(family, tmp_path):
    root, base, experts = family
    spec_experts = {"raw": [], "gram": []}
    for t, e in enumerate(experts):
        model = TextModel.load(e, device="cpu")
        texts = TEXTS[t::2] + TEXTS[:4]
        save_file({k: v.contiguous() for k, v in raw_inputs(model, texts).items()}, str(tmp_path / f"raw{t}.safetensors"))
        save_calibration(capture_gram(model, texts, batch_size=1), str(tmp_path / f"gram{t}.safetensors"))
        for kind in spec_experts:
            spec_experts[kind].append({"uri": e, "name": f"task{t}", "calibration": {"uri": str(tmp_path / f"{kind}{t}.safetensors")}})
    out = {}
    for kind, exps in spec_experts.items():
        res = merging.merge({"method": "esm", "base": {"uri": base}, "experts": exps,
                             "output": {"uri": str(tmp_path / f"out_{kind}"), "dtype": "float64"},
                             "options": {"compute_dtype": "float64", "diagnostics": "off", "device": "cpu"}})
        roles = {r["key"]: r for r in res.manifest["tensors"]}
        assert any("attention.self.query" in k for k in roles)
        out[kind] = load_file(str(tmp_path / f"out_{kind}" / "model.safetensors"))
    assert out["raw"].keys() == out["gram"].keys()
    base_sd = load_file(os.path.join(base, "model.safetensors"))
    esd = [k for k in out["raw"] if any(s in k for s in ("query.weight", "key.weight", "value.weight", "intermediate.dense.weight"))]
    assert len(esd) == 8
    for k in out["raw"]:
        # float64 summation order only (c_fc-like layers sit at the rank budget, §4.3: ~1e-11)
        torch.testing.assert_close(out["gram"][k], out["raw"][k], rtol=1e-9, atol=1e-10, msg=k)
    assert all(not torch.equal(out["raw"][k], base_sd[k].double()) for k in esd)
    # the merged directory runs as a model again (config and tokenizer copied from the base)
    merged = TextModel.load(str(tmp_path / "out_gram"), device="cpu")
    assert merged.embed(["the cat"]).shape == (1, 32)


def test_saved_file_is_what_merging_reads(family, tmp_path):
    _, base, _ = family
    model = TextModel.load(base, device="cpu")
    stats = capture_gram(model, TEXTS[:5], batch_size=2)
    path = tmp_path / "sub" / "stats.safetensors"
    save_calibration(stats, str(path))
    assert os.listdir(path.parent) == ["stats.safetensors"]  # no temporary file left
    f = _open_file(str(path), "expert 'x'", IOConfig())
    key = "encoder.layer.1.intermediate.dense.weight"
    assert key in f.keys()
    gram, n = f.stats(key, 32)
    assert torch.equal(gram, stats[f"{key}:gram"]) and n == int(stats[f"{key}:count"])


def test_cache_key():
    k = calibration_cache_key("a" * 64, "b" * 64, 32, 128)
    assert len(k) == 64 and k == calibration_cache_key("a" * 64, "b" * 64, 32, 128)
    assert len({k, calibration_cache_key("a" * 64, "b" * 64, 16, 128), calibration_cache_key("a" * 64, "b" * 64, 32, 64),
                calibration_cache_key("c" * 64, "b" * 64, 32, 128), calibration_cache_key("a" * 64, "c" * 64, 32, 128)}) == 5


def test_cli_calibrate_writes_capture_gram_output(family, tmp_path, capsys):
    _, base, experts = family
    rows = make_task_rows(9, seed=3, text_field="body")
    data = write_jsonl(tmp_path / "task.jsonl", rows)
    out = tmp_path / "calib.safetensors"
    rc = submerge(["calibrate", "--model", experts[0], "--data", data, "--samples", "6", "--text-field", "body",
                   "--batch-size", "4", "--max-length", "64", "--device", "cpu", "-o", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    line = captured.out.strip()
    assert line.startswith("calibrated 13 layers on ") and str(out) in line and "from 6 texts" in line
    written = load_file(str(out))
    expected = capture_gram(TextModel.load(experts[0], device="cpu"), [r["body"] for r in rows[:6]], batch_size=4, max_length=64)
    assert written.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(written[k], expected[k], rtol=0, atol=0)

    rc = submerge(["calibrate", "--model", experts[0], "--data", data, "--samples", "6", "-o", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("submerge: error: invalid_task_data: ") and "task.jsonl line 1" in err and "'text'" in err
    rc = submerge(["calibrate", "--model", experts[0], "--data", data, "--samples", "0", "-o", str(tmp_path / "x.safetensors")])
    assert rc == 2 and "--samples must be at least 1" in capsys.readouterr().err
    rc = submerge(["calibrate", "--model", str(tmp_path / "nope"), "--data", data, "--text-field", "body", "-o", str(tmp_path / "x.safetensors")])
    assert rc == 1 and "model_load_error" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
