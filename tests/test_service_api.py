"""The REST API in embedded mode (SQLite, local storage, in-process pool), over real HTTP."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import pytest
import torch

from workers.jobs.models import STATUSES
from tests.prom import sample, samples
from tests.service_fixtures import *  # noqa: F401,F403
from tests.service_fixtures import API_KEYS, MANY_SHAPES, TOKENS, job_spec, service_settings, sha256_bytes, write_family


def test_submit_poll_succeeds_with_artifacts_sha256_report_events(api, checkpoints, tmp_path):
    srv = api(service_settings(tmp_path))
    base, experts = write_family(checkpoints)
    body = job_spec(base, experts, output={"uri": "/somewhere/else", "dtype": "float16"})
    with srv.client() as c:
        r = c.post("/v1/merges", json=body)
        assert r.status_code == 202, r.text
        job = r.json()
        assert r.headers["location"] == f"/v1/merges/{job['id']}"
        assert job["status"] in ("queued", "running", "succeeded")
        assert job["requested_output"] == {"uri": "/somewhere/else", "dtype": "float16"}
        job = srv.wait(c, job["id"])
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 1 and job["error"] is None
        assert job["progress"]["fraction"] == 1.0 and job["phase"] == "done"
        assert job["started_at"] and job["finished_at"] and job["duration_seconds"] is not None
        result = job["result"]
        model_dir = tmp_path / "data" / "artifacts" / job["id"] / "model"
        assert result["model_uri"] == f"file://{model_dir}"
        assert not (tmp_path.parent / "somewhere").exists()
        assert result["manifest"]["method"] == "task_arithmetic" and "tensors" not in result["manifest"]
        # the spec's dtype is honoured, its output.uri is not
        assert job["spec"]["output"]["dtype"] == "float16" and job["spec"]["output"]["uri"] == f"file://{model_dir}"

        arts = c.get(f"/v1/merges/{job['id']}/artifacts").json()["items"]
        names = {a["path"] for a in arts}
        assert {"model.safetensors", "config.json", "README.md", "merge.json"} <= names
        for a in arts:
            data = c.get(a["url"]).content
            assert len(data) == a["size"] and sha256_bytes(data) == a["sha256"], a["path"]
            assert sha256_bytes((model_dir / a["path"]).read_bytes()) == a["sha256"]
        manifest = json.loads(c.get(f"/v1/merges/{job['id']}/artifacts/merge.json").content)
        st = next(a for a in arts if a["path"] == "model.safetensors")
        assert manifest["files"]["model.safetensors"]["sha256"] == st["sha256"]

        report = c.get(f"/v1/merges/{job['id']}/report")
        assert report.status_code == 200 and report.headers["content-type"].startswith("application/json")
        rep = report.json()
        assert rep["job_id"] == job["id"] and rep["coverage"]["summary"]["total"] == len(rep["coverage"]["tensors"]) == 6
        assert "total" in rep["timings_s"] and rep["artifacts"] == [{k: a[k] for k in ("path", "size", "sha256", "uri")} for a in arts]
        assert rep["diagnostics"]["format"] == "submerge.diagnostics/1" and rep["diagnostics"]["errors"] == []
        assert json.loads((model_dir / "diagnostics.json").read_text())["sampling"] == rep["diagnostics"]["sampling"]
        html = c.get(f"/v1/merges/{job['id']}/report", params={"format": "html"})
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
        assert "<img" in html.text and "data:image/png;base64," in html.text
        assert c.get(f"/v1/merges/{job['id']}/report", params={"format": "pdf"}).status_code == 422

        events = c.get(f"/v1/merges/{job['id']}/events").json()["items"]
        types = [e["type"] for e in events]
        assert types[0] == "queued" and types[1] == "started" and types[-1] == "finished"
        phases = [e["data"]["phase"] for e in events if e["type"] == "phase"]
        assert phases[0] == "inspect" and "merge" in phases and phases[-1] == "done"
        assert all(e["at"].endswith("Z") for e in events)
        assert c.get(f"/v1/merges/{job['id']}/artifacts/../report.json").status_code == 404


def test_range_request_on_artifact(api, checkpoints, tmp_path):
    srv = api(service_settings(tmp_path))
    base, experts = write_family(checkpoints)
    with srv.client() as c:
        job = srv.wait(c, c.post("/v1/merges", json=job_spec(base, experts)).json()["id"])
        url = f"/v1/merges/{job['id']}/artifacts/model.safetensors"
        full = c.get(url)
        assert full.status_code == 200 and full.headers["accept-ranges"] == "bytes"
        r = c.get(url, headers={"Range": "bytes=8-71"})
        assert r.status_code == 206
        assert r.headers["content-range"] == f"bytes 8-71/{len(full.content)}"
        assert r.content == full.content[8:72]
        tail = c.get(url, headers={"Range": "bytes=-16"})
        assert tail.status_code == 206 and tail.content == full.content[-16:]
        assert c.get(url, headers={"Range": f"bytes={len(full.content) + 10}-"}).status_code == 416


def test_idempotency_key_same_body_same_job_different_body_409(api, checkpoints, tmp_path):
    srv = api(service_settings(tmp_path))
    base, experts = write_family(checkpoints)
    body = job_spec(base, experts)
    with srv.client() as c:
        r1 = c.post("/v1/merges", json=body, headers={"Idempotency-Key": "k-1"})
        r2 = c.post("/v1/merges", json=dict(reversed(list(body.items()))), headers={"Idempotency-Key": "k-1"})
        assert r1.status_code == r2.status_code == 202
        assert r1.json()["id"] == r2.json()["id"] and r2.headers["idempotent-replayed"] == "true"
        r3 = c.post("/v1/merges", json={**body, "params": {"alpha": 0.7}}, headers={"Idempotency-Key": "k-1"})
        assert r3.status_code == 409 and r3.json()["error"]["code"] == "idempotency_conflict"
        r4 = c.post("/v1/merges", json=body, headers={"Idempotency-Key": "k-2"})
        assert r4.json()["id"] != r1.json()["id"]
        assert len(c.get("/v1/merges").json()["items"]) == 2
        srv.wait(c, r1.json()["id"])
        srv.wait(c, r4.json()["id"])


@pytest.mark.parametrize("patch, field, words", [
    ({"params": {"alpha": 0.5, "k": 3}}, "params.k", "unknown parameter"),
    ({"method": "ties", "params": {"k": 250}}, "params.k", "100"),
    ({"method": "no_such_method"}, "method", "unknown method"),
    ({"experts": [{"uri": "a"}]}, "experts", "at least 2"),
    ({"options": {"device": "tpu"}}, "options.device", "cpu"),
    ({"surprise": 1}, "surprise", "unknown field"),
])
def test_invalid_spec_422_names_the_field(api, checkpoints, tmp_path, patch, field, words):
    srv = api(service_settings(tmp_path))
    base, experts = write_family(checkpoints)
    with srv.client() as c:
        for route in ("/v1/merges", "/v1/merges:validate"):
            r = c.post(route, json={**job_spec(base, experts), **patch})
            assert r.status_code == 422, r.text
            err = r.json()["error"]
            assert err["code"] == "invalid_spec" and err["field"] == field, err
            assert err["message"].startswith(f"{field}: ") and words in err["message"], err
            assert err["details"][0]["field"] == field
        assert c.get("/v1/merges").json()["items"] == []


def test_other_422_bodies_have_the_same_shape(api, tmp_path):
    srv = api(service_settings(tmp_path))
    with srv.client() as c:
        for r, field in [(c.get("/v1/merges?limit=0"), "limit"), (c.get("/v1/merges?status=done"), "status"),
                         (c.get("/v1/merges?cursor=@@"), "cursor")]:
            assert r.status_code == 422
            err = r.json()["error"]
            assert err["field"] == field and err["message"].startswith(f"{field}: ") and err["code"] == "invalid_request"
        r = c.post("/v1/merges", content=b"{nope", headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_json"
        r = c.get("/v1/merges/does-not-exist")
        assert r.status_code == 404 and r.json() == {"error": {"code": "not_found", "message": "merge job not found"}}


def test_validate_reports_shape_mismatch(api, checkpoints, tmp_path):
    srv = api(service_settings(tmp_path))
    base, experts = checkpoints.family()
    bad = dict(experts[1])
    bad["model.layers.0.mlp.up_proj.weight"] = torch.zeros(24, 8)
    b = checkpoints.file(base, "base.safetensors")
    e0 = checkpoints.file(experts[0], "e0.safetensors")
    e1 = checkpoints.file(bad, "e1.safetensors")
    with srv.client() as c:
        ok = c.post("/v1/merges:validate", json=job_spec(b, [e0, e0.replace("e0", "e0")] and [e0, checkpoints.file(experts[1], "e1ok.safetensors")]))
        assert ok.status_code == 200 and ok.json()["valid"] is True
        assert ok.json()["summary"]["tensors"] == {"total": 6, "merged": 6, "copied": 0}
        r = c.post("/v1/merges:validate", json=job_spec(b, [e0, e1]))
        assert r.status_code == 200
        rep = r.json()
        assert rep["valid"] is False and rep["error"]["code"] == "incompatible_checkpoints"
        assert "model.layers.0.mlp.up_proj.weight" in rep["error"]["message"] and "[24, 8]" in rep["error"]["message"]
        assert "expert1" in rep["error"]["message"]
        # a dry run creates no job
        assert c.get("/v1/merges").json()["items"] == []


def test_cancel_running_job_publishes_nothing(api, checkpoints, tmp_path):
    srv = api(service_settings(tmp_path, debug_step_delay=0.1))
    base, experts = write_family(checkpoints, shapes=MANY_SHAPES)
    with srv.client() as c:
        job = c.post("/v1/merges", json=job_spec(base, experts)).json()
        srv.wait(c, job["id"], statuses=("running",), pred=lambda j: j["phase"] == "merge" and j["progress"]["done"] >= 2)
        t0 = time.monotonic()
        r = c.post(f"/v1/merges/{job['id']}:cancel")
        assert r.status_code == 202 and r.json()["status"] in ("cancelling", "cancelled")
        done = srv.wait(c, job["id"], timeout=10)
        assert done["status"] == "cancelled" and done["error"]["code"] == "cancelled"
        assert time.monotonic() - t0 < 3, "cancel was not prompt"
        assert done["progress"]["done"] < 40
        job_dir = tmp_path / "data" / "artifacts" / job["id"]
        assert not job_dir.exists()
        assert not list((tmp_path / "data" / "artifacts").glob("**/*.safetensors"))
        assert c.get(f"/v1/merges/{job['id']}/artifacts").status_code == 409
        types = [e["type"] for e in c.get(f"/v1/merges/{job['id']}/events").json()["items"]]
        assert "cancel_requested" in types and types[-1] == "finished"
        assert c.post(f"/v1/merges/{job['id']}:cancel").status_code == 409
        # a queued job is cancelled at once
        j1 = c.post("/v1/merges", json=job_spec(base, experts)).json()
        j2 = c.post("/v1/merges", json=job_spec(base, experts)).json()
        assert c.post(f"/v1/merges/{j2['id']}:cancel").json()["status"] == "cancelled"
        c.post(f"/v1/merges/{j1['id']}:cancel")
        srv.wait(c, j1["id"], timeout=10)
        assert srv.wait(c, j2["id"])["attempts"] == 0


def test_tenant_isolation_and_auth(api, checkpoints, tmp_path):
    srv = api(service_settings(tmp_path, auth="auto", api_keys=API_KEYS))
    base, experts = write_family(checkpoints)
    with srv.client(TOKENS["tenantA"]) as a, srv.client(TOKENS["tenantB"]) as b, srv.client() as anon, \
            srv.client("wrong-token") as wrong:
        assert anon.get("/v1/merges").status_code == 401
        assert anon.get("/v1/merges").headers["www-authenticate"] == "Bearer"
        assert wrong.get("/v1/methods").status_code == 401
        assert anon.get("/healthz").status_code == 200
        job = a.post("/v1/merges", json=job_spec(base, experts)).json()
        srv.wait(a, job["id"])
        jid = job["id"]
        for path in (f"/v1/merges/{jid}", f"/v1/merges/{jid}/events", f"/v1/merges/{jid}/report",
                     f"/v1/merges/{jid}/report?format=html",
                     f"/v1/merges/{jid}/artifacts", f"/v1/merges/{jid}/artifacts/model.safetensors"):
            assert a.get(path).status_code == 200, path
            r = b.get(path)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
        assert b.post(f"/v1/merges/{jid}:cancel").status_code == 404
        assert [j["id"] for j in a.get("/v1/merges").json()["items"]] == [jid]
        assert b.get("/v1/merges").json()["items"] == []
        # idempotency keys are per tenant
        rb = b.post("/v1/merges", json=job_spec(base, experts, params={"alpha": 0.1}), headers={"Idempotency-Key": "same"})
        ra = a.post("/v1/merges", json=job_spec(base, experts), headers={"Idempotency-Key": "same"})
        assert rb.status_code == ra.status_code == 202 and rb.json()["id"] != ra.json()["id"]
        srv.wait(a, ra.json()["id"])
        srv.wait(b, rb.json()["id"])


def test_auth_defaults(tmp_path):
    from service.auth import auth_required
    s = service_settings(tmp_path, auth="auto")
    assert not auth_required(s, "127.0.0.1") and not auth_required(s, "::1")
    assert auth_required(s, "0.0.0.0") and auth_required(s, "10.1.2.3")
    assert auth_required(service_settings(tmp_path, auth="auto", redis_url="redis://x"), "127.0.0.1")
    assert auth_required(service_settings(tmp_path, auth="auto", api_keys=API_KEYS), "127.0.0.1")
    assert not auth_required(service_settings(tmp_path, auth="off", redis_url="redis://x"), "0.0.0.0")
    assert auth_required(service_settings(tmp_path, auth="on"), "127.0.0.1")


def test_uri_policy_refuses_loopback_http_and_files_outside_roots(api, checkpoints, tmp_path, serve_http):
    base, experts = write_family(checkpoints)
    http = serve_http(checkpoints.root)
    http_spec = job_spec(http.url_for("base/model.safetensors"), [http.url_for("e0.safetensors"), http.url_for("e1.safetensors")])
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "x.safetensors").write_bytes(b"")
    link = tmp_path / "sneaky.safetensors"
    link.symlink_to(outside / "x.safetensors")
    srv = api(service_settings(tmp_path))
    with srv.client() as c:
        cases = [
            (http_spec, "base.uri", "non-public address 127.0.0.1"),
            (job_spec(base, [experts[0], f"http://localhost:{http.url.rsplit(':', 1)[1]}/e1.safetensors"]), "experts.1.uri", "non-public"),
            (job_spec(base, [experts[0], "http://[::1]/e1.safetensors"]), "experts.1.uri", "non-public address ::1"),
            (job_spec(base, [experts[0], "http://169.254.169.254/latest/meta-data"]), "experts.1.uri", "non-public"),
            (job_spec(f"file://{outside}/x.safetensors", experts), "base.uri", "outside the allowed file roots"),
            (job_spec("/etc/hostname", experts), "base.uri", "outside the allowed file roots"),
            (job_spec(str(tmp_path / ".." / outside.name / "x.safetensors"), experts), "base.uri", "outside"),
            (job_spec(str(link), experts), "base.uri", "outside"),
            (job_spec(base, [experts[0], "ftp://example.org/x"]), "experts.1.uri", "scheme 'ftp' is not allowed"),
            (job_spec(base, experts, callback_url="http://127.0.0.1:9/hook"), "callback_url", "non-public"),
        ]
        for body, field, words in cases:
            for route in ("/v1/merges", "/v1/merges:validate"):
                r = c.post(route, json=body)
                assert r.status_code == 422, (body, r.text)
                err = r.json()["error"]
                assert err["code"] == "uri_not_allowed" and err["field"] == field and words in err["message"], err
        assert c.get("/v1/merges").json()["items"] == []
    assert not [r for r in http.requests], "the refused URLs were fetched"
    srv.stop()
    # explicitly allowed: the loopback file server works
    srv = api(service_settings(tmp_path, allowed_private_networks=["127.0.0.1/32"], data_dir=str(tmp_path / "data2")))
    with srv.client() as c:
        job = srv.wait(c, c.post("/v1/merges", json=http_spec).json()["id"])
        assert job["status"] == "succeeded", job
    srv.stop()
    srv = api(service_settings(tmp_path, allowed_hosts=["*.example.org"], data_dir=str(tmp_path / "data3")))
    with srv.client() as c:
        r = c.post("/v1/merges", json=job_spec(base, [experts[0], "https://evil.test/x.safetensors"]))
        assert r.status_code == 422 and "SUBMERGE_ALLOWED_HOSTS" in r.json()["error"]["message"]


def test_webhook_delivered_with_valid_signature_and_retried(api, checkpoints, tmp_path, webhook_receiver):
    secret = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
    rec = webhook_receiver(fail_first=1)
    srv = api(service_settings(tmp_path, webhook_secret=secret, allowed_private_networks=["127.0.0.0/8"]))
    base, experts = write_family(checkpoints)
    with srv.client() as c:
        job = srv.wait(c, c.post("/v1/merges", json=job_spec(base, experts, callback_url=rec.url)).json()["id"])
        assert rec.event.wait(15), "webhook not delivered"
        assert len(rec.requests) == 2  # one 500, one retry
        req = rec.requests[-1]
        h = req["headers"]
        # verify independently of workers.webhooks: Standard Webhooks, v1 = HMAC-SHA256 over id.timestamp.body
        key = base64.b64decode(secret.removeprefix("whsec_"))
        signed = f"{h['webhook-id']}.{h['webhook-timestamp']}.".encode() + req["body"]
        expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        assert h["webhook-signature"] == f"v1,{expected}"
        assert abs(int(h["webhook-timestamp"]) - time.time()) < 60
        assert h["webhook-id"] == rec.requests[0]["headers"]["webhook-id"]  # same id across retries
        payload = json.loads(req["body"])
        assert payload["type"] == "merge.succeeded" and payload["data"]["id"] == job["id"]
        assert payload["data"]["result"]["artifacts"]
        deadline = time.monotonic() + 5
        while "webhook_delivered" not in [e["type"] for e in c.get(f"/v1/merges/{job['id']}/events").json()["items"]]:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_metrics_exposition_has_jobs_by_status(api, checkpoints, tmp_path):
    srv = api(service_settings(tmp_path))
    base, experts = write_family(checkpoints)
    with srv.client() as c:
        srv.wait(c, c.post("/v1/merges", json=job_spec(base, experts)).json()["id"])
        bad = c.post("/v1/merges", json=job_spec(base, [experts[0], str(tmp_path / "missing.safetensors")])).json()
        failed = srv.wait(c, bad["id"])
        assert failed["status"] == "failed" and failed["error"]["code"] == "unreadable_uri"
        r = c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
        got = samples(r.text)  # prometheus-client's parser: the exposition is well-formed
        assert "# TYPE submerge_job_duration_seconds histogram" in r.text.splitlines()
        assert {name for name, _ in got} == {  # the series the hand-written exposition had
            "submerge_jobs", "submerge_job_duration_seconds_bucket", "submerge_job_duration_seconds_sum",
            "submerge_job_duration_seconds_count", "submerge_queue_depth", "submerge_broker_queue_length",
            "submerge_oldest_queued_job_age_seconds"}
        assert {labels for name, labels in got if name == "submerge_jobs"} == {(("status", s),) for s in STATUSES}
        assert sample(r.text, "submerge_jobs", status="succeeded") == 1 and sample(r.text, "submerge_jobs", status="failed") == 1
        assert sample(r.text, "submerge_jobs", status="queued") == 0
        les = [dict(labels)["le"] for name, labels in got if name == "submerge_job_duration_seconds_bucket"]
        assert les == ["1.0", "5.0", "15.0", "60.0", "300.0", "900.0", "3600.0", "14400.0", "43200.0", "+Inf"]
        assert sample(r.text, "submerge_job_duration_seconds_bucket", le="+Inf") == 2
        assert sample(r.text, "submerge_job_duration_seconds_count") == 2
        assert sample(r.text, "submerge_queue_depth") == 0 and sample(r.text, "submerge_oldest_queued_job_age_seconds") == 0


def test_list_newest_first_with_cursor_and_status_filter(api, checkpoints, tmp_path):
    srv = api(service_settings(tmp_path))
    base, experts = write_family(checkpoints)
    with srv.client() as c:
        ids = [c.post("/v1/merges", json=job_spec(base, experts, params={"alpha": 0.1 * (i + 1)})).json()["id"] for i in range(5)]
        for i in ids:
            srv.wait(c, i)
        seen, cursor = [], None
        while True:
            page = c.get("/v1/merges", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
            assert len(page["items"]) <= 2
            seen += [j["id"] for j in page["items"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert seen == list(reversed(ids))
        assert len(c.get("/v1/merges", params={"status": "succeeded"}).json()["items"]) == 5
        assert c.get("/v1/merges", params={"status": "failed"}).json()["items"] == []


def test_methods_health_ready(api, tmp_path):
    srv = api(service_settings(tmp_path))
    with srv.client() as c:
        methods = c.get("/v1/methods").json()["items"]
        ties = next(m for m in methods if m["id"] == "ties")
        assert ties["defaults"]["k"] == 20 and "properties" in ties["params_schema"]
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz").json()
        assert ready["status"] == "ready" and set(ready["checks"]) == {"database", "storage"}


def test_embedded_pool_retries_a_job_whose_worker_died(api, checkpoints, tmp_path):
    """A job left 'running' by a dead process is requeued by the reaper and then succeeds;
    one out of attempts fails with worker_lost."""
    from workers.jobs.store import JobStore
    settings = service_settings(tmp_path, max_attempts=2)
    base, experts = write_family(checkpoints)
    srv = api(settings)
    store = JobStore(settings.db_url)
    with srv.client() as c:
        # two jobs claimed by a "worker" that then vanished (its lease runs out)
        j1, _ = store.create(tenant="default", method="task_arithmetic", spec={}, requested_output=None, max_attempts=2)
        real = c.post("/v1/merges", json=job_spec(base, experts)).json()
        srv.wait(c, real["id"])
        from sqlalchemy import update

        from workers.jobs.models import Job
        with store.Session.begin() as s:
            spec = json.loads(json.dumps(real["spec"]).replace(real["id"], j1.id))
            s.execute(update(Job).where(Job.id == j1.id).values(spec=spec, status="running", attempts=1,
                                                                  worker="ghost", lease_until=Job.created_at))
        job = srv.wait(c, j1.id, timeout=20)
        assert job["status"] == "succeeded" and job["attempts"] == 2, job
        types = [e["type"] for e in c.get(f"/v1/merges/{j1.id}/events").json()["items"]]
        assert types.count("started") == 1 and "retry" in types
        with store.Session.begin() as s:
            s.execute(update(Job).where(Job.id == j1.id).values(status="running", attempts=2, worker="ghost",
                                                                  lease_until=Job.created_at, result=None))
        job = srv.wait(c, j1.id, statuses=("failed",), timeout=20)
        assert job["error"]["code"] == "worker_lost" and "2 attempt" in job["error"]["message"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_job_runs_on_the_gpu_when_there_is_one(api, checkpoints, tmp_path):
    settings = service_settings(tmp_path)
    assert settings.concurrency() == torch.cuda.device_count()  # one job per GPU by default
    srv = api(settings)
    base, experts = write_family(checkpoints)
    with srv.client() as c:
        body = job_spec(base, experts, method="tsv_m", params={})
        body["options"] = {"device": "auto"}
        job = srv.wait(c, c.post("/v1/merges", json=body).json()["id"])
        assert job["status"] == "succeeded", job
        assert job["result"]["manifest"]["device"].startswith("cuda")
        arts = c.get(f"/v1/merges/{job['id']}/artifacts").json()["items"]
        st = next(a for a in arts if a["path"] == "model.safetensors")
        assert sha256_bytes(c.get(st["url"]).content) == st["sha256"]
