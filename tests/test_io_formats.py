"""Checkpoint formats and output layout: sharded == unsharded inputs, sharded output == single file,
streamed result == a plain in-memory computation, PyTorch files, side files and merge.json."""
from __future__ import annotations

import hashlib
import json
import os
import pathlib

import pytest
import torch
from safetensors.torch import load_file

import merging
from merging.io.checkpoint import open_checkpoint
from merging.io.sources import IOConfig


def _cfg(tmp_path) -> IOConfig:
    return IOConfig(cache_dir=str(tmp_path / "cache"))


def _read_model(d) -> dict[str, torch.Tensor]:
    """Load a model directory's tensors, single file or sharded."""
    index = os.path.join(d, "model.safetensors.index.json")
    if not os.path.exists(index):
        return load_file(os.path.join(d, "model.safetensors"))
    out = {}
    for shard in sorted(set(json.load(open(index))["weight_map"].values())):
        out.update(load_file(os.path.join(d, shard)))
    return out


def _bytes(d, name):
    with open(os.path.join(d, name), "rb") as f:
        return f.read()


# ---- 6. sharded == unsharded, streamed == in memory -----------------------------------------------

@pytest.mark.parametrize("method, params", [("task_arithmetic", {"alpha": 0.7}), ("weight_average", {}), ("ties", {"k": 30})])
def test_sharded_inputs_give_bit_identical_output(checkpoints, tmp_path, spec, method, params):
    base, experts = checkpoints.family(n_experts=3)
    single = [checkpoints.file(base, "single/base.safetensors")] + \
        [checkpoints.file(e, f"single/e{i}.safetensors") for i, e in enumerate(experts)]
    sharded = [checkpoints.directory(base, "sharded/base", shards=3)] + \
        [checkpoints.directory(e, f"sharded/e{i}", shards=2 + i) for i, e in enumerate(experts)]
    # mixed: a sharded index URI, a directory with one file
    mixed = [os.path.join(sharded[0], "model.safetensors.index.json"),
             checkpoints.directory(experts[0], "mixed/e0"), sharded[2], single[3]]
    outs = []
    for name, uris in (("single", single), ("sharded", sharded), ("mixed", mixed)):
        out = tmp_path / f"out_{name}"
        merging.merge(spec(uris[0], uris[1:], str(out), method=method, params=params), io=_cfg(tmp_path))
        outs.append(_bytes(out, "model.safetensors"))
    assert outs[0] == outs[1] == outs[2]


def test_sharded_output_reads_back_equal_to_single_file(checkpoints, tmp_path, spec):
    base, experts = checkpoints.family(n_experts=2)
    uris = [checkpoints.file(base, "b.safetensors")] + [checkpoints.file(e, f"e{i}.safetensors") for i, e in enumerate(experts)]
    one, many = tmp_path / "one", tmp_path / "many"
    merging.merge(spec(uris[0], uris[1:], str(one)), io=_cfg(tmp_path))
    r = merging.merge(spec(uris[0], uris[1:], str(many), shard_size="1KiB"), io=_cfg(tmp_path))
    names = sorted(os.listdir(many))
    shards = [n for n in names if n.startswith("model-")]
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(base) and set(index["weight_map"].values()) == set(shards)
    single = load_file(str(one / "model.safetensors"))
    total = 0
    for shard in shards:
        part = load_file(str(many / shard))
        for k, v in part.items():
            assert index["weight_map"][k] == shard
            assert torch.equal(v, single[k]) and v.dtype == single[k].dtype
            total += v.numel() * v.element_size()
    assert index["metadata"]["total_size"] == total
    assert set(r.files) == set(names) - {"merge.json"}
    # a sharded output is itself a valid input
    ck = open_checkpoint(str(many), "base", _cfg(tmp_path))
    assert ck.format == "safetensors-sharded" and all(torch.equal(ck.read(k), single[k]) for k in single)
    ck.close()


def test_streamed_merge_equals_in_memory_computation(checkpoints, tmp_path, spec):
    base, experts = checkpoints.family(n_experts=4)
    uris = [checkpoints.directory(base, "b", shards=2)] + [checkpoints.file(e, f"e{i}.safetensors") for i, e in enumerate(experts)]
    alpha = 0.35
    s = spec(uris[0], uris[1:], str(tmp_path / "out"), params={"alpha": alpha}, dtype="float64")
    s["options"]["compute_dtype"] = "float64"
    merging.merge(s, io=_cfg(tmp_path))
    out = _read_model(tmp_path / "out")
    for k, b in base.items():
        want = b.double() + alpha * sum(e[k].double() - b.double() for e in experts)
        assert out[k].dtype == torch.float64
        torch.testing.assert_close(out[k], want, rtol=0, atol=1e-12)
    # weight_average: the plain mean of the experts, in the base dtype (float32 here)
    merging.merge(spec(uris[0], uris[1:], str(tmp_path / "avg"), method="weight_average"), io=_cfg(tmp_path))
    avg = _read_model(tmp_path / "avg")
    for k in base:
        want = torch.stack([e[k].double() for e in experts]).mean(0)
        assert avg[k].dtype == torch.float32
        torch.testing.assert_close(avg[k].double(), want, rtol=0, atol=1e-5)


def test_mixed_dtypes_and_integer_tensors(checkpoints, tmp_path, spec):
    shapes = {"a.weight": (8, 8), "b.bias": (8,)}
    base, experts = checkpoints.family(shapes=shapes, dtype=torch.bfloat16)
    for t in (base, *experts):
        t["pos_ids"] = torch.arange(8, dtype=torch.int64)
        t["h.weight"] = torch.ones(4, 4, dtype=torch.float16)
    experts[0]["pos_ids"] = torch.arange(8, dtype=torch.int64) * 2  # ignored: integers are copied from the base
    uris = [checkpoints.file(base, "b.safetensors")] + [checkpoints.file(e, f"e{i}.safetensors") for i, e in enumerate(experts)]
    r = merging.merge(spec(uris[0], uris[1:], str(tmp_path / "out")), io=_cfg(tmp_path))
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert out["a.weight"].dtype == torch.bfloat16 and out["h.weight"].dtype == torch.float16
    assert torch.equal(out["pos_ids"], torch.arange(8))
    rows = {row["key"]: row for row in r.manifest["tensors"]}
    assert rows["pos_ids"]["action"] == "copied" and rows["a.weight"]["action"] == "merged"


# ---- PyTorch files ----------------------------------------------------------------------------

def test_pytorch_bin_and_pt_inputs(checkpoints, tmp_path, spec):
    base, experts = checkpoints.family()
    st = [checkpoints.file(base, "st/b.safetensors")] + [checkpoints.file(e, f"st/e{i}.safetensors") for i, e in enumerate(experts)]
    (tmp_path / "pt" / "base").mkdir(parents=True)
    torch.save(base, tmp_path / "pt" / "base" / "pytorch_model.bin")
    torch.save({"state_dict": experts[0]}, tmp_path / "pt" / "e0.pt")
    torch.save(experts[1], tmp_path / "pt" / "e1.pth", _use_new_zipfile_serialization=False)  # legacy format
    # a sharded PyTorch checkpoint with its index
    d = tmp_path / "pt" / "e1sharded"
    d.mkdir()
    keys = list(experts[1])
    torch.save({k: experts[1][k] for k in keys[:3]}, d / "pytorch_model-00001-of-00002.bin")
    torch.save({k: experts[1][k] for k in keys[3:]}, d / "pytorch_model-00002-of-00002.bin")
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        **{k: "pytorch_model-00001-of-00002.bin" for k in keys[:3]}, **{k: "pytorch_model-00002-of-00002.bin" for k in keys[3:]}}}))
    merging.merge(spec(st[0], st[1:], str(tmp_path / "ref")), io=_cfg(tmp_path))
    want = _bytes(tmp_path / "ref", "model.safetensors")
    for e1 in ("e1.pth", "e1sharded"):
        out = tmp_path / f"out_{e1}"
        r = merging.merge(spec(str(tmp_path / "pt" / "base"), [str(tmp_path / "pt" / "e0.pt"), str(tmp_path / "pt" / e1)], str(out)),
                          io=_cfg(tmp_path))
        assert _bytes(out, "model.safetensors") == want
        assert [i["format"] for i in r.manifest["inputs"]] == ["torch", "torch", "torch"]


# ---- 7. side files and merge.json -------------------------------------------------------------------

def test_side_files_copied_and_manifest_hashes_match(checkpoints, tmp_path, spec):
    base, experts = checkpoints.family(n_experts=2)
    side = {"config.json": json.dumps({"model_type": "llama", "hidden_size": 16}), "tokenizer.json": '{"version": "1.0"}',
            "tokenizer_config.json": "{}", "special_tokens_map.json": "{}", "generation_config.json": "{}",
            "tokenizer.model": b"\x00\x01binary-sentencepiece", "added_tokens.json": '{"<|im_start|>": 32}',
            "chat_template.jinja": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
            "chat_template.json": '{"chat_template": "{{ messages }}"}', "notes.txt": "not a model side file"}
    b = checkpoints.directory(base, "base", side_files=side, shards=2)
    es = [checkpoints.directory(e, f"e{i}", side_files={"config.json": '{"from": "expert"}'}) for i, e in enumerate(experts)]
    out = tmp_path / "out"
    r = merging.merge(spec(b, es, str(out), shard_size="2KiB"), io=_cfg(tmp_path))
    names = set(os.listdir(out))
    for name, content in side.items():
        if name == "notes.txt":
            assert name not in names
        else:
            assert _bytes(out, name) == (content if isinstance(content, bytes) else content.encode())  # the base's, not the experts'
    manifest = json.loads((out / "merge.json").read_text())
    assert manifest == json.loads(json.dumps(r.manifest))
    assert set(manifest["files"]) == names - {"merge.json"}
    for name, info in manifest["files"].items():
        data = _bytes(out, name)
        assert info["sha256"] == hashlib.sha256(data).hexdigest() and info["size"] == len(data)
    rows = manifest["tensors"]
    assert sorted(row["key"] for row in rows) == sorted(base) and len(rows) == len(base)
    for row in rows:
        assert row["shape"] == list(base[row["key"]].shape) and row["action"] == "merged" and row["role"]
    assert manifest["coverage"] == {"total": len(base), "merged": len(base), "copied": 0}
    # inputs: every data file hashed
    inp = {i["name"]: i for i in manifest["inputs"]}
    assert set(inp["base"]["files"]) == {f for f in os.listdir(b) if f.endswith(".safetensors")}
    for name, digest in inp["base"]["files"].items():
        assert digest == hashlib.sha256(_bytes(b, name)).hexdigest()
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_file_uris_in_and_out(checkpoints, tmp_path, spec):
    base, experts = checkpoints.family()
    uris = [f"file://{checkpoints.directory(base, 'b', side_files={'config.json': '{}'})}"] + \
        [f"file://{checkpoints.file(e, f'e{i}.safetensors')}" for i, e in enumerate(experts)]
    out = tmp_path / "deep" / "er" / "out"
    merging.merge(spec(uris[0], uris[1:], f"file://{out}/"), io=_cfg(tmp_path))
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "diagnostics.json", "merge.json", "model.safetensors"]
    assert sorted(os.listdir(out.parent)) == ["out"]


# ---- the output shards' digests, computed while the tensors land --------------------------------


def test_open_checkpoint_takes_a_pathlib_path(checkpoints, tmp_path):
    """Python callers hold paths as pathlib.Path (the benchmark's model package returns one)."""
    base, _ = checkpoints.family()
    directory = checkpoints.directory(base, "b")
    by_path = open_checkpoint(pathlib.Path(directory), "base", _cfg(tmp_path))
    by_str = open_checkpoint(str(directory), "base", _cfg(tmp_path))
    assert by_path.keys() == by_str.keys() and by_path.keys()
    key = next(iter(by_path.keys()))
    assert torch.equal(by_path.read(key), by_str.read(key))

def _writer_entries():
    g = torch.Generator().manual_seed(0)
    tensors = {f"layers.{i}.weight": torch.randn(64 + i, 48, generator=g) for i in range(12)}
    tensors.update({f"layers.{i}.bias": torch.randn(40, generator=g).to(torch.bfloat16) for i in range(12)})
    tensors.update({"empty.a": torch.zeros(0, 5), "empty.b": torch.zeros(3, 0, dtype=torch.int64), "step": torch.tensor(7)})
    return tensors


@pytest.mark.parametrize("shard_size, order", [(1 << 30, "shuffled"), (30_000, "shuffled"), (30_000, "reversed"),
                                               (30_000, "layout")])
def test_writer_digests_equal_the_files_whatever_the_write_order(tmp_path, shard_size, order):
    """The digests are fed in file order from writes in any order: shuffled and reversed writes
    leave gaps that later writes close, empty tensors share an offset with the next one."""
    from merging.io.writer import ShardedWriter, natural_key
    tensors = _writer_entries()
    writer = ShardedWriter(str(tmp_path), [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], shard_size)
    keys = sorted(tensors, key=natural_key)
    if order == "shuffled":
        keys = [keys[i] for i in torch.randperm(len(keys), generator=torch.Generator().manual_seed(1)).tolist()]
    elif order == "reversed":
        keys.reverse()
    for k in keys:
        writer.write(k, tensors[k])
    names = writer.close()
    shards = [n for n in names if n.endswith(".safetensors")]
    assert (len(shards) > 1) == (shard_size < 1 << 20)
    assert set(writer.sha256) == set(shards)
    for name in shards:
        assert writer.sha256[name] == hashlib.sha256(_bytes(tmp_path, name)).hexdigest(), name
    read = _read_model(tmp_path)
    assert read.keys() == tensors.keys()
    for k, v in read.items():
        assert torch.equal(v, tensors[k]), k


def test_writer_refuses_a_second_write_and_aborts_cleanly(tmp_path):
    from merging.errors import OutputError
    from merging.io.writer import ShardedWriter
    tensors = _writer_entries()
    writer = ShardedWriter(str(tmp_path), [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], 30_000)
    writer.write("layers.0.weight", tensors["layers.0.weight"])
    with pytest.raises(OutputError, match="'layers.0.weight' written twice"):
        writer.write("layers.0.weight", tensors["layers.0.weight"])
    with pytest.raises(OutputError, match="never written"):
        writer.close()
    assert writer.sha256 == {}
    writer.abort()  # idempotent: the descriptors are closed once


def test_shard_digest_hashes_what_no_write_reported(tmp_path):
    """The digest is of the file, not of the reported ranges: bytes no write reported (a gap
    in the layout, a range lost) are hashed when the digest is finished."""
    import concurrent.futures
    import threading
    from merging.io.writer import _ShardDigest
    data = bytes(range(256)) * 40
    path = tmp_path / "shard"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            digest = _ShardDigest(fd, data[:16], pool, threading.Event())
            digest.wrote(16, 1000)
            digest.wrote(3000, 5000)  # [1000, 3000) and the end are never reported
            assert digest.finish(len(data)) == hashlib.sha256(data).hexdigest()
    finally:
        os.close(fd)
