"""Merges from and to remote URIs, against real servers on loopback (moto S3, a Range-capable HTTP
server): headers first, downloads once, s3 -> s3 publishing."""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load, load_file

import merging
from merging.errors import IncompatibleCheckpointsError, OutputError
from merging.io.sources import IOConfig, Location


def _files_under(d) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)


def _data_files_in_cache(d) -> list[str]:
    """Cached files other than small JSON metadata (an index is read whole to find the shards)."""
    return [f for f in _files_under(d) if not f.endswith(".json")]


def _mismatched_family(checkpoints):
    base, experts = checkpoints.family()
    bad = dict(experts[1])
    bad["model.layers.0.mlp.up_proj.weight"] = torch.zeros(24, 8)
    return base, [experts[0], bad]


# ---- 2. headers first: a bad job fails before any download -----------------------------------------

def test_http_shape_mismatch_fails_before_any_download(serve_http, checkpoints, tmp_path, spec):
    base, experts = _mismatched_family(checkpoints)
    checkpoints.directory(base, "srv/base", side_files={"config.json": "{}"})
    checkpoints.file(experts[0], "srv/e0.safetensors")
    checkpoints.directory(experts[1], "srv/e1", shards=2)
    srv = serve_http(checkpoints.root / "srv")
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    with pytest.raises(IncompatibleCheckpointsError) as ei:
        merging.merge(spec(srv.url_for("base/"), [srv.url_for("e0.safetensors"), srv.url_for("e1")], str(out)),
                      io=IOConfig(cache_dir=str(cache)))
    msg = str(ei.value)
    assert "model.layers.0.mlp.up_proj.weight" in msg and "expert1" in msg and "[24, 8]" in msg
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".partial-" in p]
    assert _data_files_in_cache(cache) == []
    # only HEADs and small ranged header reads of the .safetensors files
    st_gets = srv.gets(".safetensors")
    assert st_gets and all(g.range and g.range.startswith("bytes=0-") for g in st_gets)
    assert all(int(g.range.split("-")[1]) < (1 << 16) for g in st_gets)


def test_s3_shape_mismatch_fails_before_any_download(s3_server, checkpoints, tmp_path, spec):
    base, experts = _mismatched_family(checkpoints)
    bucket = s3_server.new_bucket()
    b = s3_server.upload_dir(checkpoints.directory(base, "base", shards=2), bucket, "base")
    e0 = s3_server.upload_dir(checkpoints.directory(experts[0], "e0"), bucket, "e0")
    e1 = s3_server.upload_dir(checkpoints.directory(experts[1], "e1"), bucket, "e1")
    cache = tmp_path / "cache"
    out_bucket = s3_server.new_bucket("out")
    cfg = IOConfig(storage_options={"s3": s3_server.storage_options}, cache_dir=str(cache))
    for out in (str(tmp_path / "out"), f"s3://{out_bucket}/merged"):
        with pytest.raises(IncompatibleCheckpointsError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*expert1"):
            merging.merge(spec(b, [e0, e1 + "/model.safetensors"], out), io=cfg)
        assert _data_files_in_cache(cache) == []
    assert not (tmp_path / "out").exists()
    assert s3_server.keys(out_bucket) == []


# ---- 3. a second merge of the same URIs downloads nothing -----------------------------------------

def test_http_second_merge_does_not_download_again(serve_http, checkpoints, tmp_path, spec):
    base, experts = checkpoints.family(n_experts=3)
    checkpoints.directory(base, "srv/base", shards=2, side_files={"config.json": '{"model_type": "x"}'})
    for i, e in enumerate(experts):
        checkpoints.file(e, f"srv/e{i}.safetensors")
    srv = serve_http(checkpoints.root / "srv")
    cfg = IOConfig(cache_dir=str(tmp_path / "cache"))
    uris = [srv.url_for(f"e{i}.safetensors") for i in range(3)]
    r1 = merging.merge(spec(srv.url_for("base"), uris, str(tmp_path / "out1")), io=cfg)
    full = srv.gets(full_only=True)
    # every remote file was fetched exactly once
    assert sorted(g.path for g in full) == sorted(
        ["/base/model.safetensors.index.json", "/base/model-00001-of-00002.safetensors",
         "/base/model-00002-of-00002.safetensors", "/base/config.json", "/e0.safetensors", "/e1.safetensors", "/e2.safetensors"])
    srv.clear()
    r2 = merging.merge(spec(srv.url_for("base"), uris, str(tmp_path / "out2")), io=cfg)
    assert srv.gets() == [], [(g.path, g.range) for g in srv.gets()]
    assert all(r.method == "HEAD" or r.status == 404 for r in srv.requests)  # probes of absent side files
    for name in ("model.safetensors", "config.json"):
        assert r1.files[name]["sha256"] == r2.files[name]["sha256"]
    assert r1.manifest["inputs"] == r2.manifest["inputs"]
    # and the result is the one from local files
    local = merging.merge(spec(os.path.join(checkpoints.root, "srv/base"),
                               [str(checkpoints.root / f"srv/e{i}.safetensors") for i in range(3)], str(tmp_path / "out3")),
                          io=IOConfig(cache_dir=str(tmp_path / "cache2")))
    assert local.files["model.safetensors"]["sha256"] == r1.files["model.safetensors"]["sha256"]
    # input hashes in the manifest are the hashes of the served files
    served = hashlib.sha256((checkpoints.root / "srv/e1.safetensors").read_bytes()).hexdigest()
    assert r1.manifest["inputs"][2]["files"] == {"e1.safetensors": served}


# ---- 4. output to s3:// -------------------------------------------------------------------------

def _s3_put_order(monkeypatch, cfg: IOConfig, bucket: str) -> list[str]:
    """Record (without replacing) the uploads the Publisher makes through s3fs."""
    fs = Location(f"s3://{bucket}/x", cfg).fs  # the same cached filesystem instance the merge uses
    order: list[str] = []
    real = fs.put_file

    def put_file(lpath, rpath, *a, **kw):
        order.append(rpath.rsplit("/", 1)[-1])
        return real(lpath, rpath, *a, **kw)
    monkeypatch.setattr(fs, "put_file", put_file)
    return order


def test_s3_to_s3_merge_matches_local_merge(s3_server, checkpoints, tmp_path, spec, monkeypatch):
    base, experts = checkpoints.family(n_experts=3)
    side = {"config.json": '{"model_type": "tiny"}', "tokenizer_config.json": "{}"}
    bucket = s3_server.new_bucket()
    local_base = checkpoints.directory(base, "base", side_files=side)
    local_experts = [checkpoints.directory(e, f"e{i}", shards=2) for i, e in enumerate(experts)]
    b = s3_server.upload_dir(local_base, bucket, "in/base")
    es = [s3_server.upload_dir(d, bucket, f"in/e{i}") for i, d in enumerate(local_experts)]
    cache = tmp_path / "cache"
    cfg = IOConfig(storage_options={"s3": s3_server.storage_options}, cache_dir=str(cache))
    order = _s3_put_order(monkeypatch, cfg, bucket)
    out_opts = {"shard_size": "4KiB"}

    result = merging.merge(spec(b, es, f"s3://{bucket}/out/merged", **out_opts), io=cfg)
    local = merging.merge(spec(local_base, local_experts, str(tmp_path / "local"), **out_opts),
                          io=IOConfig(cache_dir=str(tmp_path / "cache2")))

    keys = s3_server.keys(bucket, "out/merged/")
    names = sorted(k.rsplit("/", 1)[-1] for k in keys)
    assert names == sorted(os.listdir(tmp_path / "local"))
    assert order[-1] == "merge.json" and sorted(order) == names
    assert len([n for n in names if n.startswith("model-")]) > 1  # sharded output
    manifest = json.loads(s3_server.get(bucket, "out/merged/merge.json"))
    for name in names:
        data = s3_server.get(bucket, f"out/merged/{name}")
        if name != "merge.json":
            assert hashlib.sha256(data).hexdigest() == manifest["files"][name]["sha256"]
            assert len(data) == manifest["files"][name]["size"]
        if name.endswith(".safetensors"):
            assert data == (tmp_path / "local" / name).read_bytes()
            got, want = load(data), load_file(str(tmp_path / "local" / name))
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert s3_server.get(bucket, "out/merged/config.json") == side["config.json"].encode()
    assert result.files == {n: v for n, v in local.files.items() if n != "README.md"} | {"README.md": result.files["README.md"]}
    assert not [p for p in os.listdir(cache) if p.startswith("submerge-out-")]  # staging removed

    # the same target again: refused without overwrite, untouched
    with pytest.raises(OutputError, match=rf"output\.uri: s3://{bucket}/out/merged already holds a merged model"):
        merging.merge(spec(b, es, f"s3://{bucket}/out/merged"), io=cfg)
    assert s3_server.keys(bucket, "out/merged/") == keys
    # with overwrite into one shard: the old shards and index go away
    merging.merge(spec(b, es, f"s3://{bucket}/out/merged", overwrite=True), io=cfg)
    names2 = sorted(k.rsplit("/", 1)[-1] for k in s3_server.keys(bucket, "out/merged/"))
    assert names2 == ["README.md", "config.json", "diagnostics.json", "merge.json", "model.safetensors", "tokenizer_config.json"]
    single = load(s3_server.get(bucket, "out/merged/model.safetensors"))
    for k, v in single.items():
        assert torch.equal(v, load_file(str(tmp_path / "local" / json.loads(
            (tmp_path / "local" / "model.safetensors.index.json").read_text())["weight_map"][k]))[k])


def test_http_inputs_to_s3_output(serve_http, s3_server, checkpoints, tmp_path, spec):
    base, experts = checkpoints.family()
    checkpoints.file(base, "srv/base.safetensors")
    for i, e in enumerate(experts):
        checkpoints.file(e, f"srv/e{i}.safetensors")
    srv = serve_http(checkpoints.root / "srv")
    bucket = s3_server.new_bucket()
    cfg = IOConfig(storage_options={"s3": s3_server.storage_options}, cache_dir=str(tmp_path / "cache"))
    merging.merge(spec(srv.url_for("base.safetensors"), [srv.url_for("e0.safetensors"), srv.url_for("e1.safetensors")],
                       f"s3://{bucket}/m", params={"alpha": 1.0}), io=cfg)
    out = load(s3_server.get(bucket, "m/model.safetensors"))
    for k in base:
        want = (base[k].double() + sum(e[k].double() - base[k].double() for e in experts)).float()
        assert torch.allclose(out[k], want, atol=1e-6)
