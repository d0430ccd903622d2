"""Sources by URI: scheme handling, hf:// revisions (no hub contact), S3 endpoint options, ranged
reads and the download cache, against real local, HTTP and S3 (moto) servers on loopback."""
from __future__ import annotations

import threading

import pytest
import torch

from merging.errors import InputError, UnreadableURIError
from merging.io.checkpoint import open_checkpoint
from merging.io.sources import IOConfig, Location, hf_path, split_scheme, storage_options_for


# ---- URI parsing --------------------------------------------------------------------------------

def test_split_scheme():
    assert split_scheme("/a/b") == ("", "/a/b")
    assert split_scheme("file:///a/b") == ("file", "/a/b")
    assert split_scheme("S3://bucket/k") == ("s3", "bucket/k")
    assert split_scheme("hf://org/repo@v1/x") == ("hf", "org/repo@v1/x")


@pytest.mark.parametrize("rest, revision, expected", [
    ("org/repo", "v1.0", "org/repo@v1.0"),
    ("org/repo/model.safetensors", "main", "org/repo@main/model.safetensors"),
    ("org/repo/sub/dir/model.safetensors", "0123abc", "org/repo@0123abc/sub/dir/model.safetensors"),
    ("org/repo@v2/model.safetensors", None, "org/repo@v2/model.safetensors"),
    ("org/repo@v2/model.safetensors", "v2", "org/repo@v2/model.safetensors"),
    ("org/repo/model.safetensors", None, "org/repo/model.safetensors"),
    ("org/repo", "refs/pr/1", "org/repo@refs%2Fpr%2F1"),
    ("datasets/org/repo/x.safetensors", "v1", "datasets/org/repo@v1/x.safetensors"),
    ("gpt2", "main", "gpt2@main"),
])
def test_hf_revision_is_spliced_into_path(rest, revision, expected):
    assert hf_path(rest, revision) == expected


def test_hf_conflicting_revision_is_refused():
    with pytest.raises(UnreadableURIError, match="conflicts"):
        hf_path("org/repo@v1/model.safetensors", "v2")


def test_hf_location_carries_checkpointref_revision(monkeypatch):
    """CheckpointRef.revision reaches HfFileSystem as repo@rev, without contacting the hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loc = Location("hf://org/repo/model.safetensors", IOConfig(), revision="v1.2")
    assert loc.path == "org/repo@v1.2/model.safetensors"
    assert loc.remote and loc.name == "model.safetensors"
    assert loc.sibling("config.json").path == "org/repo@v1.2/config.json"
    assert loc.parent().child("model.safetensors.index.json").path == "org/repo@v1.2/model.safetensors.index.json"
    root = Location("hf://org/repo", IOConfig(), revision="abc123")
    assert root.child("config.json").path == "org/repo@abc123/config.json"
    assert root.child("config.json").uri == "hf://org/repo/config.json"


def test_revision_on_a_non_hf_uri_is_an_error(tmp_path, checkpoints):
    path = checkpoints.file(checkpoints.weights(0), "a.safetensors")
    with pytest.raises(InputError, match="base: revision 'v1' is only supported for hf://"):
        open_checkpoint(path, "base", IOConfig(cache_dir=str(tmp_path / "c")), revision="v1")


def test_unsupported_scheme(tmp_path):
    with pytest.raises(UnreadableURIError, match=r"expert 'x'.*ftp://host/m\.safetensors"):
        open_checkpoint("ftp://host/m.safetensors", "expert 'x'", IOConfig(cache_dir=str(tmp_path)))


# ---- S3 endpoint options ------------------------------------------------------------------------

def test_s3_endpoint_from_storage_options_and_env(monkeypatch):
    monkeypatch.delenv("SUBMERGE_S3_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert "endpoint_url" not in storage_options_for("s3", IOConfig(storage_options={}))
    # given in IOConfig, either spelling
    opts = storage_options_for("s3", IOConfig(storage_options={"s3": {"endpoint_url": "http://127.0.0.1:1"}}))
    assert opts["endpoint_url"] == "http://127.0.0.1:1"
    opts = storage_options_for("s3", IOConfig(storage_options={"s3": {"client_kwargs": {"endpoint_url": "http://127.0.0.1:2", "region_name": "x"}}}))
    assert opts["endpoint_url"] == "http://127.0.0.1:2" and opts["client_kwargs"] == {"region_name": "x"}
    # from the environment, also when other S3 options are configured
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:3")
    assert storage_options_for("s3", IOConfig(storage_options={"s3": {"key": "k"}}))["endpoint_url"] == "http://127.0.0.1:3"
    monkeypatch.setenv("SUBMERGE_S3_ENDPOINT_URL", "http://127.0.0.1:4")
    assert storage_options_for("s3", IOConfig())["endpoint_url"] == "http://127.0.0.1:4"
    # explicit configuration wins over the environment
    opts = storage_options_for("s3", IOConfig(storage_options={"s3": {"endpoint_url": "http://127.0.0.1:5"}}))
    assert opts["endpoint_url"] == "http://127.0.0.1:5"


def test_s3_endpoint_from_env_reaches_the_server(s3_server, checkpoints, tmp_path, monkeypatch):
    bucket = s3_server.new_bucket()
    path = checkpoints.file(checkpoints.weights(1), "m.safetensors")
    s3_server.client().upload_file(path, bucket, "m.safetensors")
    monkeypatch.setenv("SUBMERGE_S3_ENDPOINT_URL", s3_server.endpoint)
    cfg = IOConfig(storage_options={"s3": {"key": s3_server.key, "secret": s3_server.secret}}, cache_dir=str(tmp_path / "c"))
    ck = open_checkpoint(f"s3://{bucket}/m.safetensors", "base", cfg)
    assert set(ck.keys()) == set(checkpoints.weights(1))


# ---- local paths and file:// ----------------------------------------------------------------------

def test_local_path_and_file_uri_are_the_same(checkpoints, tmp_path):
    w = checkpoints.weights(3)
    d = checkpoints.directory(w, "m", side_files={"config.json": "{}"})
    cfg = IOConfig(cache_dir=str(tmp_path / "c"))
    for uri in (d, f"file://{d}", f"{d}/model.safetensors", f"file://{d}/model.safetensors"):
        ck = open_checkpoint(uri, "base", cfg)
        try:
            assert ck.format == "safetensors"
            for k, v in w.items():
                assert torch.equal(ck.read(k), v)
        finally:
            ck.close()
    assert not (tmp_path / "c").exists()  # local files are read in place


# ---- HTTP ---------------------------------------------------------------------------------------

def test_http_ranged_reads_are_exact(serve_http, tmp_path):
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 64)  # 16 KiB
    srv = serve_http(tmp_path)
    loc = Location(srv.url_for("blob.bin"), IOConfig(cache_dir=str(tmp_path / "c")))
    assert loc.size() == 16384
    assert loc.read_range(0, 8) == bytes(range(8))
    assert loc.read_range(300, 10) == bytes(range(44, 54))
    assert loc.read_range(16380, 100) == bytes(range(252, 256))  # clipped at the end
    gets = srv.gets("blob.bin")
    assert [g.range for g in gets] == ["bytes=0-7", "bytes=300-309", "bytes=16380-16383"]
    assert not (tmp_path / "c").exists()


def test_http_server_without_range_support_still_reads_headers(serve_http, checkpoints, tmp_path):
    w = checkpoints.weights(4)
    checkpoints.file(w, "srv/m.safetensors")
    srv = serve_http(checkpoints.root / "srv", honour_range=False)
    ck = open_checkpoint(srv.url_for("m.safetensors"), "base", IOConfig(cache_dir=str(tmp_path / "c")))
    try:
        assert {k: tuple(v.shape) for k, v in w.items()} == {k: m.shape for k, m in ck.metas.items()}
        for k, v in w.items():
            assert torch.equal(ck.read(k), v)
    finally:
        ck.close()


def test_http_download_happens_once_even_from_many_threads(serve_http, tmp_path):
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "big.bin").write_bytes(b"x" * 300_000)
    srv = serve_http(tmp_path / "srv")
    cfg = IOConfig(cache_dir=str(tmp_path / "c"))
    paths, errors = [], []

    def fetch():
        try:
            paths.append(Location(srv.url_for("big.bin"), cfg).local_path())
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=fetch) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(paths)) == 1
    assert open(paths[0], "rb").read() == b"x" * 300_000
    assert len(srv.gets("big.bin", full_only=True)) == 1
    # a later Location for the same URL reads from the cache, ranged reads included
    loc = Location(srv.url_for("big.bin"), cfg)
    assert loc.local_path() == paths[0] and loc.read_range(10, 5) == b"xxxxx"
    assert len(srv.gets("big.bin")) == 1


def test_http_changed_file_is_downloaded_again(serve_http, tmp_path):
    (tmp_path / "srv").mkdir()
    f = tmp_path / "srv" / "a.bin"
    f.write_bytes(b"one")
    srv = serve_http(tmp_path / "srv")
    cfg = IOConfig(cache_dir=str(tmp_path / "c"))
    first = Location(srv.url_for("a.bin"), cfg).local_path()
    f.write_bytes(b"two!")
    second = Location(srv.url_for("a.bin"), cfg).local_path()
    assert first != second and open(second, "rb").read() == b"two!"


@pytest.mark.parametrize("suffix", ["/", ""])
def test_http_model_directory_is_probed(serve_http, checkpoints, tmp_path, suffix):
    base, _ = checkpoints.family()
    checkpoints.directory(base, "srv/sharded", shards=3, side_files={"config.json": '{"a": 1}', "tokenizer.json": "{}"})
    checkpoints.directory(base, "srv/single", side_files={"config.json": "{}"})
    srv = serve_http(checkpoints.root / "srv")
    cfg = IOConfig(cache_dir=str(tmp_path / "c"))
    ck = open_checkpoint(srv.url_for("sharded") + suffix, "base", cfg)
    assert ck.format == "safetensors-sharded" and len(ck.data_files()) == 3
    assert sorted(ck.side_files) == ["config.json", "tokenizer.json"]
    assert ck.side_files["config.json"].read_all() == b'{"a": 1}'
    ck.close()
    ck = open_checkpoint(srv.url_for("single") + suffix, "base", cfg)
    assert ck.format == "safetensors" and sorted(ck.side_files) == ["config.json"]
    for k, v in base.items():
        assert torch.equal(ck.read(k), v)
    ck.close()


# ---- S3 -----------------------------------------------------------------------------------------

def test_s3_directory_file_and_index(s3_server, checkpoints, tmp_path):
    base, _ = checkpoints.family()
    local = checkpoints.directory(base, "m", shards=2, side_files={"config.json": "{}"})
    bucket = s3_server.new_bucket()
    uri = s3_server.upload_dir(local, bucket, "models/m")
    cfg = IOConfig(storage_options={"s3": s3_server.storage_options}, cache_dir=str(tmp_path / "c"))
    for u in (uri, uri + "/", uri + "/model.safetensors.index.json"):
        ck = open_checkpoint(u, "base", cfg)
        try:
            assert ck.format == "safetensors-sharded"
            assert sorted(ck.side_files) == ["config.json"]  # also beside a standard weight/index file
            for k, v in base.items():
                assert torch.equal(ck.read(k), v)
        finally:
            ck.close()
