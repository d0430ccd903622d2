"""evaluation.models: tiny real BERTs (transformers, offline) loaded by checkpoint key."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from evaluation.errors import ModelLoadError
from evaluation.models import TextModel, load_model, local_model_dir
from merging.io.sources import IOConfig
from tests.tiny_bert import make_task_rows, make_tiny_bert, perturb_checkpoint

TEXTS = ["the cat", "red blue green gold", "", "a photo of a dog and a lion and a very brown bear"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    base = make_tiny_bert(root / "base", seed=0)
    expert = perturb_checkpoint(base, root / "expert", seed=1, scale=0.05)
    clf = make_tiny_bert(root / "clf", seed=2, num_labels=3)
    return {"root": root, "base": base, "expert": expert, "clf": clf}


@pytest.fixture(scope="module")
def base(dirs):
    return TextModel.load(dirs["base"], device="cpu")


def test_state_keys_are_the_checkpoint_keys(dirs, base):
    keys = list(load_file(os.path.join(dirs["base"], "model.safetensors")))
    assert sorted(base.state_keys()) == sorted(keys)
    assert set(base.model.state_dict()) == set(keys)  # the model's own names: no renaming
    assert base.device == torch.device("cpu") and not base.model.training
    lin = base.linear_layers()
    assert "encoder.layer.0.attention.self.query.weight" in lin and "pooler.dense.weight" in lin
    assert all(k in keys and isinstance(m, torch.nn.Linear) for k, m in lin.items())
    assert len(lin) == 2 * 6 + 1  # q, k, v, attn out, intermediate, output per layer + pooler

    clf = TextModel.load(dirs["clf"], device="cpu")
    assert "classifier.weight" in clf.state_keys() and "bert.pooler.dense.weight" in clf.linear_layers()
    assert clf.architecture == "BertForSequenceClassification"


def test_set_state_swaps_weights_in_and_back(dirs, base):
    before = base.embed(TEXTS)
    expert_state = load_file(os.path.join(dirs["expert"], "model.safetensors"))
    base_state = base.get_state()
    base.set_state({k: v.double() for k, v in expert_state.items()})  # cast on the way in
    swapped = base.embed(TEXTS)
    assert not torch.allclose(swapped, before, atol=1e-4)
    expert = TextModel.load(dirs["expert"], device="cpu")
    torch.testing.assert_close(swapped, expert.embed(TEXTS), rtol=0, atol=1e-6)
    base.set_state(base_state)
    assert torch.equal(base.embed(TEXTS), before)


def test_embed_is_unit_norm_and_padding_free(base):
    e = base.embed(TEXTS, batch_size=3)
    assert e.shape == (len(TEXTS), 32) and e.dtype == torch.float32 and e.device.type == "cpu"
    torch.testing.assert_close(e.norm(dim=1), torch.ones(len(TEXTS)))
    short, long = TEXTS[0], TEXTS[3]
    assert len(base.tokenizer(short)["input_ids"]) < len(base.tokenizer(long)["input_ids"])
    alone = base.embed([short])
    padded = base.embed([short, long], batch_size=2)  # short is padded to long's length
    torch.testing.assert_close(padded[0], alone[0], rtol=0, atol=2e-6)
    # batch size and order do not matter either
    torch.testing.assert_close(base.embed(TEXTS[::-1], batch_size=1).flip(0), e, rtol=0, atol=2e-6)
    assert base.embed([]).shape == (0, 32)


def test_classify_and_heads(dirs, base):
    clf = TextModel.load(dirs["clf"], device="cpu")
    rows = make_task_rows(5)
    logits = clf.classify([r["text"] for r in rows], batch_size=2)
    assert logits.shape == (5, 3) and logits.dtype == torch.float32
    with pytest.raises(ModelLoadError, match="no sequence-classification head"):
        base.classify(["the cat"])


def test_set_state_rejects_unknown_keys_and_wrong_shapes(base):
    with pytest.raises(ModelLoadError, match="'encoder.layer.9.output.dense.weight'"):
        base.set_state({"encoder.layer.9.output.dense.weight": torch.zeros(32, 64)})
    key = "encoder.layer.0.output.dense.weight"
    before = base.get_state([key])[key]
    with pytest.raises(ModelLoadError, match=r"'encoder\.layer\.0\.output\.dense\.weight' has shape \[64, 32\]"):
        base.set_state({key: torch.zeros(64, 32)})
    assert torch.equal(base.get_state([key])[key], before)


def test_load_errors_name_the_dir_and_key(dirs, tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        os.makedirs(tmp_path / "empty")
        TextModel.load(str(tmp_path / "empty"))
    # no tokenizer files: error, unless tokenizer_dir is given
    bare = make_tiny_bert(tmp_path / "bare", seed=3, tokenizer=False)
    with pytest.raises(ModelLoadError, match=r"bare: no tokenizer files"):
        TextModel.load(bare, device="cpu")
    m = TextModel.load(bare, device="cpu", tokenizer_dir=dirs["base"])
    assert m.embed(["the cat"]).shape == (1, 32)
    # a checkpoint key the architecture does not have, and one it lacks
    for name, edit, pattern in [
        ("renamed", lambda sd: sd.update({"encoder.layer.0.extra.weight": sd.pop("encoder.layer.0.output.dense.weight")}),
         r"renamed: checkpoint tensor 'encoder\.layer\.0\.extra\.weight' is not a parameter"),
        ("missing", lambda sd: sd.pop("pooler.dense.bias"), r"missing: the checkpoint has no tensor for BertModel's 'pooler\.dense\.bias'"),
        ("shape", lambda sd: sd.update({"pooler.dense.bias": torch.zeros(33)}), r"'pooler\.dense\.bias' has shape \[33\]"),
    ]:
        d = tmp_path / name
        shutil.copytree(dirs["base"], d)
        sd = load_file(str(d / "model.safetensors"))
        edit(sd)
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(ModelLoadError, match=pattern):
            TextModel.load(str(d), device="cpu")


def test_load_model_adapters(dirs):
    m = load_model(dirs["base"], device="cpu")
    assert isinstance(m, TextModel)
    m2 = load_model(dirs["base"], adapter="python:evaluation.models:TextModel.load", device="cpu")
    assert isinstance(m2, TextModel) and m2.state_keys() == m.state_keys()
    with pytest.raises(ModelLoadError, match="unknown model adapter 'onnx'"):
        load_model(dirs["base"], adapter="onnx")
    with pytest.raises(ModelLoadError, match="cannot import"):
        load_model(dirs["base"], adapter="python:no_such_module_xyz:load")


def test_local_model_dir_local_paths(dirs, tmp_path):
    assert local_model_dir(dirs["base"]) == os.path.abspath(dirs["base"])
    assert local_model_dir("file://" + os.path.abspath(dirs["base"])) == os.path.abspath(dirs["base"])
    assert local_model_dir(os.path.join(dirs["base"], "model.safetensors")) == os.path.abspath(dirs["base"])
    with pytest.raises(ModelLoadError, match="nowhere: not found"):
        local_model_dir(str(tmp_path / "nowhere"))


def test_local_model_dir_over_http(dirs, serve_http, tmp_path):
    srv = serve_http(dirs["root"])
    cfg = IOConfig(cache_dir=str(tmp_path / "cache"))
    d = local_model_dir(srv.url_for("expert/"), cfg)
    assert d.startswith(str(tmp_path / "cache")) and {"config.json", "model.safetensors", "vocab.txt"} <= set(os.listdir(d))
    assert local_model_dir(srv.url_for("expert/"), cfg) == d  # built once
    local = TextModel.load(dirs["expert"], device="cpu")
    remote = TextModel.load(d, device="cpu")
    assert torch.equal(remote.embed(TEXTS), local.embed(TEXTS))
    with pytest.raises(ModelLoadError, match="nothing"):
        local_model_dir(srv.url_for("nothing/"), cfg)


def test_max_length_is_capped_by_the_position_table(base):
    long = " ".join(["cat"] * 400)  # 402 tokens; the tiny model has 160 positions
    e = base.embed([long], max_length=512)
    torch.testing.assert_close(e, base.embed([long], max_length=160))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(dirs, base):
    from evaluation.capture import capture_gram

    gpu = TextModel.load(dirs["base"], device="auto")
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.embed(TEXTS), base.embed(TEXTS), rtol=1e-4, atol=1e-4)
    expert_state = load_file(os.path.join(dirs["expert"], "model.safetensors"))
    gpu.set_state(expert_state)  # CPU tensors copied onto the GPU
    expert = TextModel.load(dirs["expert"], device="cpu")
    torch.testing.assert_close(gpu.embed(TEXTS), expert.embed(TEXTS), rtol=1e-4, atol=1e-4)
    g_gpu, g_cpu = capture_gram(gpu, TEXTS, batch_size=2), capture_gram(expert, TEXTS, batch_size=2)
    assert g_gpu.keys() == g_cpu.keys() and all(v.device.type == "cpu" for v in g_gpu.values())
    for k in g_cpu:
        torch.testing.assert_close(g_gpu[k], g_cpu[k], rtol=1e-4, atol=1e-4)
