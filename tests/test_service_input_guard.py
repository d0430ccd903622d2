"""The URI policy holds while a job reads: symlinks inside model directories are resolved and
checked, and every http(s) redirect hop and resolved address is checked before it is used.

Real parts throughout: the API under uvicorn with its embedded worker, real files and links, and
real HTTP servers on loopback addresses (a redirector and a target that records requests).
"""
from __future__ import annotations

import os
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from merging.errors import AccessDeniedError
from merging.io.checkpoint import open_checkpoint
from merging.io.sources import IOConfig
from workers.policy import InputPolicy, job_io_config
from tests.service_fixtures import *  # noqa: F401,F403
from tests.service_fixtures import MANY_SHAPES, job_spec, service_settings, write_family


def _no_model_published(settings) -> bool:
    artifacts = Path(settings.data_path) / "artifacts"
    return not list(artifacts.glob("*/model/*"))


# --------------------------------------------------------------------------------------------
# Files: every file inside a model directory, symlinks resolved
# --------------------------------------------------------------------------------------------

def test_links_out_of_the_roots_inside_a_model_directory_are_refused_at_submission(api, checkpoints, tmp_path):
    roots = tmp_path / "roots"
    outside = tmp_path / "outside"
    outside.mkdir()
    ckpts = type(checkpoints)(roots)
    base_t, experts_t = ckpts.family(n_experts=2)
    stray = ckpts.file(experts_t[0], "../outside/stray.safetensors")  # a valid checkpoint, outside the roots
    experts = [ckpts.file(e, f"e{i}.safetensors") for i, e in enumerate(experts_t)]

    passwd_dir = Path(ckpts.directory(base_t, "base_passwd"))
    (passwd_dir / "config.json").symlink_to("/etc/passwd")
    weights_dir = roots / "base_weights"
    weights_dir.mkdir()
    (weights_dir / "model.safetensors").symlink_to(stray)

    settings = service_settings(tmp_path, file_roots=[str(roots)])
    srv = api(settings)
    with srv.client() as c:
        for base, name in ((passwd_dir, "config.json"), (weights_dir, "model.safetensors")):
            for route in ("/v1/merges", "/v1/merges:validate"):
                r = c.post(route, json=job_spec(str(base), experts))
                assert r.status_code == 422, r.text
                err = r.json()["error"]
                assert err["code"] == "uri_not_allowed" and err["field"] == "base.uri", err
                assert name in err["message"] and "outside the allowed file roots" in err["message"], err
        assert c.get("/v1/merges").json()["items"] == []
    assert _no_model_published(settings)


def test_a_side_file_swapped_for_a_link_while_the_job_runs_fails_the_job(api, checkpoints, tmp_path):
    """The submission-time check is not the only one: the worker checks each file as it opens it."""
    settings = service_settings(tmp_path, debug_step_delay=0.05)
    srv = api(settings)
    base, experts = write_family(checkpoints, shapes=MANY_SHAPES)
    config = Path(base) / "config.json"
    with srv.client() as c:
        r = c.post("/v1/merges", json=job_spec(base, experts))
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        srv.wait(c, job_id, statuses=("running",), pred=lambda j: (j.get("progress") or {}).get("done", 0) > 0)
        config.unlink()
        config.symlink_to("/etc/passwd")  # the config is copied into the output at the end of the merge
        job = srv.wait(c, job_id)
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "uri_not_allowed", job
        assert "config.json" in job["error"]["message"] and "/etc/passwd" in job["error"]["message"], job
        r = c.get(f"/v1/merges/{job_id}/artifacts/config.json")
        assert r.status_code == 409 and "root:" not in r.text
    assert _no_model_published(settings)


def test_the_library_checks_every_shard_it_opens_and_reads_anything_without_a_guard(checkpoints, tmp_path):
    roots = tmp_path / "roots"
    ckpts = type(checkpoints)(roots)
    tensors = ckpts.weights(0)
    model = Path(ckpts.directory(tensors, "model", shards=2))
    outside = tmp_path / "outside"
    outside.mkdir()
    shard = sorted(model.glob("*.safetensors"))[1]
    os.replace(shard, outside / shard.name)
    shard.symlink_to(outside / shard.name)

    guarded = IOConfig(cache_dir=str(tmp_path / "cache"),
                       guard=InputPolicy(service_settings(tmp_path, file_roots=[str(roots)])))
    with pytest.raises(AccessDeniedError) as e:
        open_checkpoint(str(model), "base", guarded)
    assert e.value.code == "uri_not_allowed" and shard.name in str(e.value) and str(outside) in str(e.value)

    ckpt = open_checkpoint(str(model), "base", IOConfig(cache_dir=str(tmp_path / "cache")))  # the CLI: no guard
    assert set(ckpt.metas) == set(tensors)


# --------------------------------------------------------------------------------------------
# HTTP: every redirect hop and every resolved address
# --------------------------------------------------------------------------------------------

class _Recorder(BaseHTTPRequestHandler):
    """Answers every request with 404 and records it: a forbidden target that must stay untouched."""
    protocol_version = "HTTP/1.0"
    seen: list

    def log_message(self, *args):
        pass

    def _answer(self):
        self.seen.append((self.command, self.path))
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _answer


def _redirector(location: str):
    class Redirect(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args):
            pass

        def _answer(self):
            self.send_response(302)
            self.send_header("Location", location + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = _answer
    return Redirect


@pytest.fixture
def http_servers():
    """``start(handler, host) -> "http://host:port"``; all stopped at teardown."""
    running = []

    def start(handler, host: str = "127.0.0.1") -> str:
        httpd = ThreadingHTTPServer((host, 0), handler)
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        running.append(httpd)
        return f"http://{host}:{httpd.server_address[1]}"

    yield start
    for httpd in running:
        httpd.shutdown()
        httpd.server_close()


def test_redirects_to_forbidden_addresses_are_refused_and_the_target_gets_no_request(api, checkpoints, tmp_path,
                                                                                     serve_http, http_servers):
    base, experts = write_family(checkpoints)
    files = serve_http(checkpoints.root)
    seen: list = []
    target = http_servers(type("Target", (_Recorder,), {"seen": seen}), host="127.0.0.2")
    # 127.0.0.1 (the redirector and the file server) is allowed; 127.0.0.2, ::1 and link-local are not.
    settings = service_settings(tmp_path, allowed_private_networks=["127.0.0.1/32"])
    srv = api(settings)
    forbidden = [target, "http://[::1]:9", "http://169.254.169.254"]
    with srv.client() as c:
        for where in forbidden:
            redirector = http_servers(_redirector(where))
            r = c.post("/v1/merges", json=job_spec(base, [experts[0], f"{redirector}/e1.safetensors"]))
            assert r.status_code == 202, r.text  # the URL as written is allowed: the hop is what is refused
            job = srv.wait(c, r.json()["id"])
            assert job["status"] == "failed", job
            err = job["error"]
            assert err["code"] == "uri_not_allowed", err
            host = urllib.parse.urlsplit(where).hostname
            assert f"redirect to {where}/e1.safetensors refused" in err["message"], err
            assert f"non-public address {host}" in err["message"], err
        # the same redirect within the policy is followed
        redirector = http_servers(_redirector(files.url))
        job = srv.wait(c, c.post("/v1/merges", json=job_spec(base, [experts[0], f"{redirector}/e1.safetensors"])).json()["id"])
        assert job["status"] == "succeeded", job
    assert seen == [], "the forbidden target was contacted"
    assert files.gets("e1.safetensors")  # the allowed hop did fetch


def test_a_redirect_to_a_host_outside_the_allow_list_is_refused(checkpoints, tmp_path, serve_http, http_servers):
    _, experts = write_family(checkpoints)
    files = serve_http(checkpoints.root)
    redirector = http_servers(_redirector(files.url.replace("127.0.0.1", "localhost")))
    settings = service_settings(tmp_path, allowed_hosts=["127.0.0.1"], allowed_private_networks=["127.0.0.0/8", "::1/128"])
    with pytest.raises(AccessDeniedError) as e:
        open_checkpoint(f"{redirector}/e1.safetensors", "expert 'e1'", job_io_config(settings))
    assert "'localhost' is not in SUBMERGE_ALLOWED_HOSTS" in str(e.value)
    assert not files.requests


def test_addresses_are_checked_when_the_connection_is_made(checkpoints, tmp_path, serve_http):
    """A host name that resolves to a forbidden address is refused at connect time, from the very
    answer the connection would use: no submission-time check is involved (DNS rebinding)."""
    _, experts = write_family(checkpoints)
    files = serve_http(checkpoints.root)
    url = files.url_for("e1.safetensors").replace("127.0.0.1", "localhost")
    assert "127.0.0.1" in {a[4][0] for a in socket.getaddrinfo("localhost", 80)}
    with pytest.raises(AccessDeniedError) as e:
        open_checkpoint(url, "expert 'e1'", job_io_config(service_settings(tmp_path)))
    assert "connection refused by policy" in str(e.value) and "'localhost'" in str(e.value)
    assert not files.requests
    allowed = job_io_config(service_settings(tmp_path, allowed_private_networks=["127.0.0.0/8", "::1/128"]))
    assert open_checkpoint(url, "expert 'e1'", allowed).metas
    assert files.gets("e1.safetensors")
