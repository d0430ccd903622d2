"""Bad input never crashes or corrupts.

Each case asserts the exception class, that the message names what is at fault (key, expert,
parameter or URI), and that nothing is left at ``output.uri``: no directory (nor the parent
directories the merge would have created), or the pre-existing one untouched, and no
``.partial-`` staging directory beside it.
"""
from __future__ import annotations

import json
import os
import struct

import pytest
import torch

import merging
from merging.errors import (CorruptCheckpointError, IncompatibleCheckpointsError, InputError, MergeError, NonFiniteInputError,
                            OutputError, SpecError, UnreadableURIError, UnsafePickleError)
from merging.io.sources import IOConfig

KEY = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture
def env(tmp_path, checkpoints):
    """Good inputs on disk, a nested output path and a private cache."""
    base, experts = checkpoints.family(n_experts=2)
    paths = [checkpoints.file(base, "base.safetensors"),
             checkpoints.file(experts[0], "e0.safetensors"), checkpoints.file(experts[1], "e1.safetensors")]

    class Env:
        pass
    e = Env()
    e.base, e.experts, e.paths = base, experts, paths
    e.outroot = tmp_path / "outroot"  # does not exist: the merge would create it
    e.out = e.outroot / "merged"
    e.cache = tmp_path / "cache"
    e.io = IOConfig(cache_dir=str(e.cache))
    e.checkpoints = checkpoints
    return e


def _snapshot(d) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(r, f), d): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(d) for f in fs}


def _open_files() -> set[str]:
    """What this process's descriptors point at (Linux), minus sockets and pipes: the S3 and HTTP
    clients keep connections in pools."""
    fd_dir = "/proc/self/fd"
    out = set()
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue  # closed while listing (the listing's own descriptor)
        if target.startswith("/"):
            out.add(target)
    return out


def expect_failure(env, spec_dict, exc, *fragments, io=None, existing=None):
    """Run the merge; check the error class, that the message names every fragment, and that
    the output location is as before (absent, or ``existing``'s snapshot) with no staging left
    and no file left open (an open output shard would keep its deleted staging file's space)."""
    open_before = _open_files()
    with pytest.raises(exc) as ei:
        merging.merge(spec_dict, io=io or env.io)
    assert _open_files() == open_before
    err = ei.value
    msg = str(err)
    assert isinstance(err, MergeError) and err.code and "\n" not in msg
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in message: {msg}"
    if existing is None:
        assert not os.path.exists(env.out), f"{env.out} left behind"
        assert not os.path.exists(env.outroot), f"{env.outroot} left behind"
    else:
        assert _snapshot(env.out) == existing
        assert not [p for p in os.listdir(env.outroot) if ".partial-" in p or ".old-" in p]
    if os.path.isdir(env.cache):
        assert not [p for p in os.listdir(env.cache) if p.startswith("submerge-out-")]
    return msg


# ---- the spec ------------------------------------------------------------------------------------

def test_fewer_than_two_experts(env, spec):
    expect_failure(env, spec(env.paths[0], env.paths[1:2], str(env.out)), SpecError, "experts", "at least 2")
    expect_failure(env, spec(env.paths[0], [], str(env.out)), SpecError, "experts")


def test_unknown_method(env, spec):
    expect_failure(env, spec(env.paths[0], env.paths[1:], str(env.out), method="frobnicate", params={}),
                   SpecError, "method", "'frobnicate'", "task_arithmetic")


def test_unknown_parameter(env, spec):
    expect_failure(env, spec(env.paths[0], env.paths[1:], str(env.out), params={"alpha": 0.5, "betta": 2}),
                   SpecError, "params.betta", "unknown parameter")


def test_parameter_out_of_range(env, spec):
    expect_failure(env, spec(env.paths[0], env.paths[1:], str(env.out), method="ties", params={"k": 150}), SpecError, "params.k")
    expect_failure(env, spec(env.paths[0], env.paths[1:], str(env.out), params={"alpha": float("nan")}), SpecError, "params.alpha")


def test_bad_output_fields(env, spec):
    expect_failure(env, spec(env.paths[0], env.paths[1:], str(env.out), shard_size="12 parsecs"), SpecError, "output.shard_size")


# ---- checkpoints that do not fit together ----------------------------------------------------------

def test_shape_mismatch(env, spec):
    bad = dict(env.experts[1])
    bad[KEY] = torch.zeros(24, 15)
    p = env.checkpoints.file(bad, "bad_shape.safetensors")
    expect_failure(env, spec(env.paths[0], [env.paths[1], p], str(env.out)), IncompatibleCheckpointsError,
                   KEY, "expert1", "[24, 15]", "[24, 16]")


def test_dtype_mismatch(env, spec):
    """Floating tensors of another precision are cast (tests/test_row_blocks.py); an integer one is not a weight."""
    bad = dict(env.experts[0])
    bad[KEY] = bad[KEY].to(torch.int16)
    p = env.checkpoints.file(bad, "bad_dtype.safetensors")
    expect_failure(env, spec(env.paths[0], [p, env.paths[2]], str(env.out)), IncompatibleCheckpointsError,
                   KEY, "expert0", "I16", "F32")


def test_key_missing_in_one_expert(env, spec):
    bad = {k: v for k, v in env.experts[1].items() if k != KEY}
    p = env.checkpoints.file(bad, "missing_key.safetensors")
    expect_failure(env, spec(env.paths[0], [env.paths[1], p], str(env.out)), IncompatibleCheckpointsError,
                   KEY, "expert1", "missing")


def test_extra_key_in_one_expert(env, spec):
    bad = dict(env.experts[0])
    bad["lm_head.extra"] = torch.zeros(3)
    p = env.checkpoints.file(bad, "extra_key.safetensors")
    expect_failure(env, spec(env.paths[0], [p, env.paths[2]], str(env.out)), IncompatibleCheckpointsError,
                   "lm_head.extra", "expert0")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_expert_tensor(env, spec, value):
    bad = dict(env.experts[1])
    t = bad[KEY].clone()
    t[3, 5] = value
    t[7, 1] = value
    bad[KEY] = t
    p = env.checkpoints.file(bad, "nonfinite.safetensors")
    s = spec(env.paths[0], [env.paths[1], p], str(env.out))
    s["experts"][1]["name"] = "math-expert"
    expect_failure(env, s, NonFiniteInputError, KEY, "expert 'math-expert'", "2 NaN/Inf")


def test_non_finite_base_tensor(env, spec):
    bad = dict(env.base)
    bad["model.norm.weight"] = bad["model.norm.weight"].clone()
    bad["model.norm.weight"][0] = float("nan")
    p = env.checkpoints.file(bad, "nonfinite_base.safetensors")
    expect_failure(env, spec(p, env.paths[1:], str(env.out)), NonFiniteInputError, "model.norm.weight", "base")


# ---- unreadable URIs ----------------------------------------------------------------------------

def test_nonexistent_path(env, spec, tmp_path):
    missing = str(tmp_path / "nowhere" / "model.safetensors")
    expect_failure(env, spec(env.paths[0], [env.paths[1], missing], str(env.out)), UnreadableURIError,
                   "expert 'expert1'", missing, "not found")
    expect_failure(env, spec(str(tmp_path / "nodir"), env.paths[1:], str(env.out)), UnreadableURIError,
                   "base", str(tmp_path / "nodir"))


def test_http_404(env, spec, serve_http):
    srv = serve_http(env.checkpoints.root)
    ok = srv.url_for("e0.safetensors")
    for missing in (srv.url_for("gone.safetensors"), srv.url_for("no/such/model/"), srv.url_for("no-such-model")):
        expect_failure(env, spec(env.paths[0], [ok, missing], str(env.out)), UnreadableURIError, "expert 'expert1'", missing)
    # a directory whose index names a shard that is not there
    d = env.checkpoints.root / "broken"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {KEY: "model-00001-of-00002.safetensors"}}))
    expect_failure(env, spec(srv.url_for("broken"), [ok, ok], str(env.out)), UnreadableURIError,
                   "base", srv.url_for("broken/model-00001-of-00002.safetensors"), "not found")


def test_http_unreachable(env, spec, unused_port):
    url = f"http://127.0.0.1:{unused_port}/model.safetensors"
    msg = expect_failure(env, spec(url, env.paths[1:], str(env.out)), UnreadableURIError, "base", url)
    assert "not found" not in msg  # says why: the connection failed


def test_nonexistent_s3_bucket(env, spec, s3_server):
    io = IOConfig(storage_options={"s3": s3_server.storage_options}, cache_dir=str(env.cache))
    uri = "s3://no-such-bucket-submerge/model.safetensors"
    expect_failure(env, spec(env.paths[0], [uri, env.paths[2]], str(env.out)), UnreadableURIError, "expert 'expert0'", uri, io=io)
    bucket = s3_server.new_bucket()
    uri = f"s3://{bucket}/missing-model"
    expect_failure(env, spec(uri, env.paths[1:], str(env.out)), UnreadableURIError, "base", uri, io=io)


# ---- corrupt files ------------------------------------------------------------------------------

def test_truncated_safetensors(env, spec, tmp_path):
    data = open(env.paths[2], "rb").read()
    p = tmp_path / "truncated.safetensors"
    p.write_bytes(data[: len(data) - 100])
    expect_failure(env, spec(env.paths[0], [env.paths[1], str(p)], str(env.out)), CorruptCheckpointError,
                   "expert 'expert1'", str(p), "truncated")
    p.write_bytes(data[:5])  # not even a header length
    expect_failure(env, spec(env.paths[0], [env.paths[1], str(p)], str(env.out)), CorruptCheckpointError,
                   "expert 'expert1'", str(p))


def test_truncated_shard_in_sharded_checkpoint(env, spec):
    d = env.checkpoints.directory(env.experts[0], "sharded_e0", shards=2)
    shard = os.path.join(d, "model-00002-of-00002.safetensors")
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[:-4])
    expect_failure(env, spec(env.paths[0], [d, env.paths[2]], str(env.out)), CorruptCheckpointError,
                   "expert 'expert0'", shard)


@pytest.mark.parametrize("header", [
    b"{this is not json",
    b"\xff\xfe\x00garbage",
    b"[1, 2, 3]",
    b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": ["a", "b"]}}',
    b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}',
    b'{"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}',
    b'{"__metadata__": [1], "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
])
def test_corrupt_header(env, spec, tmp_path, header):
    p = tmp_path / "corrupt.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 64)
    expect_failure(env, spec(env.paths[0], [str(p), env.paths[2]], str(env.out)), CorruptCheckpointError,
                   "expert 'expert0'", str(p))


def test_header_length_beyond_file(env, spec, tmp_path):
    p = tmp_path / "huge_header.safetensors"
    p.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    expect_failure(env, spec(str(p), env.paths[1:], str(env.out)), CorruptCheckpointError, "base", str(p))


@pytest.mark.parametrize("index", [
    "not json at all",
    json.dumps({"weight_map": ["a"]}),
    json.dumps({"metadata": {}}),
    json.dumps({"weight_map": {KEY: "../../../etc/passwd"}}),
    json.dumps({"weight_map": {KEY: "/abs/model.safetensors"}}),
])
def test_corrupt_index(env, spec, tmp_path, index):
    d = tmp_path / "badindex"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text(index)
    expect_failure(env, spec(str(d), env.paths[1:], str(env.out)), CorruptCheckpointError, "base", str(d))


def test_index_lists_tensor_its_shard_lacks(env, spec):
    d = env.checkpoints.directory(env.experts[0], "lying_index", shards=2)
    idx = os.path.join(d, "model.safetensors.index.json")
    data = json.load(open(idx))
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "model-00002-of-00002.safetensors" if data["weight_map"][first].startswith("model-00001") \
        else "model-00001-of-00002.safetensors"
    json.dump(data, open(idx, "w"))
    expect_failure(env, spec(env.paths[0], [d, env.paths[2]], str(env.out)), CorruptCheckpointError, "expert 'expert0'", first)


def test_empty_directory_and_unknown_format(env, spec, tmp_path):
    (tmp_path / "empty").mkdir()
    expect_failure(env, spec(str(tmp_path / "empty"), env.paths[1:], str(env.out)), InputError, "base", str(tmp_path / "empty"))
    (tmp_path / "weights.npz").write_bytes(b"PK")
    expect_failure(env, spec(env.paths[0], [str(tmp_path / "weights.npz"), env.paths[2]], str(env.out)), InputError,
                   "expert 'expert0'", "weights.npz")


# ---- pickles ------------------------------------------------------------------------------------

class Payload:
    """A custom class: never to be instantiated by loading a checkpoint."""

    def __init__(self):
        self.x = 1


class SystemCall:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["custom_class", "os_system", "os_system_legacy"])
def test_pickle_that_is_not_weights_only(env, spec, tmp_path, kind):
    marker = tmp_path / "pwned"
    sd = dict(env.experts[0])
    if kind == "custom_class":
        sd["extra"] = Payload()
    else:
        sd["extra"] = SystemCall(str(marker))
    p = tmp_path / "evil" / "pytorch_model.bin"
    p.parent.mkdir()
    torch.save(sd, p, _use_new_zipfile_serialization=(kind != "os_system_legacy"))
    s = spec(env.paths[0], [str(p.parent), env.paths[2]], str(env.out))
    s["experts"][0]["name"] = "sneaky"
    expect_failure(env, s, UnsafePickleError, "expert 'sneaky'", str(p))
    assert not marker.exists()


def test_weights_only_pickle_with_ordered_dict_is_fine(env, spec, tmp_path):
    import collections
    p = tmp_path / "ok.pt"
    torch.save(collections.OrderedDict(env.experts[0]), p)
    merging.merge(spec(env.paths[0], [str(p), env.paths[2]], str(env.out)), io=env.io)
    assert os.path.exists(env.out / "merge.json")


@pytest.mark.parametrize("content", ["garbage", "truncated", "not_a_dict", "non_tensor"])
def test_corrupt_pytorch_file(env, spec, tmp_path, content):
    p = tmp_path / "bad.bin"
    if content == "garbage":
        p.write_bytes(b"this is not a pickle at all" * 10)
    elif content == "truncated":
        torch.save(env.experts[0], p)
        p.write_bytes(p.read_bytes()[:200])
    elif content == "not_a_dict":
        torch.save([env.experts[0][KEY]], p)
    else:
        torch.save({**env.experts[0], "step": 3}, p)
    msg = expect_failure(env, spec(env.paths[0], [env.paths[1], str(p)], str(env.out)), InputError, "expert 'expert1'", str(p))
    if content == "non_tensor":
        assert "'step'" in msg


# ---- the output -----------------------------------------------------------------------------------

def test_output_exists_without_overwrite(env, spec):
    env.out.mkdir(parents=True)
    (env.out / "model.safetensors").write_bytes(b"precious")
    (env.out / "notes.txt").write_text("keep me")
    before = _snapshot(env.out)
    expect_failure(env, spec(env.paths[0], env.paths[1:], str(env.out)), OutputError, "output.uri", str(env.out), "overwrite",
                   existing=before)
    # a plain file in the way
    f = env.outroot / "file-target"
    f.write_text("x")
    with pytest.raises(OutputError, match="output.uri"):
        merging.merge(spec(env.paths[0], env.paths[1:], str(f)), io=env.io)
    assert f.read_text() == "x"


def test_failed_merge_leaves_existing_output_untouched_even_with_overwrite(env, spec):
    env.out.mkdir(parents=True)
    (env.out / "model.safetensors").write_bytes(b"previous model")
    before = _snapshot(env.out)
    bad = dict(env.experts[1])
    bad[KEY] = torch.full_like(bad[KEY], float("nan"))
    p = env.checkpoints.file(bad, "nan.safetensors")
    expect_failure(env, spec(env.paths[0], [env.paths[1], p], str(env.out), overwrite=True), NonFiniteInputError,
                   KEY, "expert1", existing=before)


def test_output_to_unwritable_scheme(env, spec):
    for uri in ("http://127.0.0.1:9/out", "hf://org/repo"):
        with pytest.raises(OutputError, match=r"output\.uri.*" + uri.split("://")[0]):
            merging.merge(spec(env.paths[0], env.paths[1:], uri), io=env.io)


def test_output_to_nonexistent_s3_bucket(env, spec, s3_server):
    io = IOConfig(storage_options={"s3": s3_server.storage_options}, cache_dir=str(env.cache))
    expect_failure(env, spec(env.paths[0], env.paths[1:], "s3://no-such-bucket-out/merged"), OutputError,
                   "output.uri", "no-such-bucket-out", io=io)


def test_failed_s3_merge_uploads_nothing(env, spec, s3_server):
    io = IOConfig(storage_options={"s3": s3_server.storage_options}, cache_dir=str(env.cache))
    bucket = s3_server.new_bucket()
    bad = dict(env.experts[1])
    bad[KEY] = bad[KEY].clone()
    bad[KEY][0, 0] = float("inf")
    p = env.checkpoints.file(bad, "inf.safetensors")
    expect_failure(env, spec(env.paths[0], [env.paths[1], p], f"s3://{bucket}/merged"), NonFiniteInputError, KEY, "expert1", io=io)
    assert s3_server.keys(bucket) == []


def test_good_merge_after_all_that(env, spec):
    """The fixture's inputs are fine: the failures above are the inputs' fault, not the setup's."""
    r = merging.merge(spec(env.paths[0], env.paths[1:], str(env.out)), io=env.io)
    assert os.path.exists(env.out / "model.safetensors") and r.manifest["coverage"]["merged"] == len(env.base)
