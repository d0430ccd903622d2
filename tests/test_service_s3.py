"""S3 storage (moto's real S3 server on loopback): layout {prefix}/{job_id}/model/... and report.json,
downloads by 307 redirect to a presigned URL, s3:// inputs with a bucket allow-list, cancel leaves nothing."""
from __future__ import annotations

import httpx

from tests.service_fixtures import *  # noqa: F401,F403
from tests.service_fixtures import MANY_SHAPES, job_spec, service_settings, sha256_bytes, write_family


def test_s3_storage_layout_presigned_downloads_and_s3_inputs(api, s3_server, checkpoints, tmp_path):
    bucket = s3_server.new_bucket("store")
    inputs = s3_server.new_bucket("inputs")
    base, experts = write_family(checkpoints)
    b = s3_server.upload_dir(base, inputs, "base")
    es = [s3_server.upload_dir(checkpoints.root, inputs, "experts") + f"/e{i}.safetensors" for i in range(2)]
    settings = service_settings(tmp_path, storage_uri=f"s3://{bucket}/jobs", s3_endpoint_url=s3_server.endpoint,
                                allowed_buckets=[inputs])
    srv = api(settings)
    with srv.client() as c:
        assert c.get("/readyz").json()["checks"]["storage"] == {"ok": True}
        job = srv.wait(c, c.post("/v1/merges", json=job_spec(b, es)).json()["id"])
        assert job["status"] == "succeeded", job
        jid = job["id"]
        assert job["result"]["model_uri"] == f"s3://{bucket}/jobs/{jid}/model"
        assert job["result"]["report_uri"] == f"s3://{bucket}/jobs/{jid}/report.json"
        keys = s3_server.keys(bucket)
        assert f"jobs/{jid}/model/model.safetensors" in keys and f"jobs/{jid}/model/merge.json" in keys
        assert f"jobs/{jid}/report.json" in keys and all(k.startswith(f"jobs/{jid}/") for k in keys)

        arts = c.get(f"/v1/merges/{jid}/artifacts").json()["items"]
        assert {a["path"] for a in arts} >= {"model.safetensors", "merge.json", "config.json"}
        for a in arts:
            r = c.get(a["url"])
            assert r.status_code == 307 and r.headers["location"].startswith(s3_server.endpoint)
            assert "Signature" in r.headers["location"] or "X-Amz-Signature" in r.headers["location"]
            data = httpx.get(r.headers["location"], timeout=30).content
            assert sha256_bytes(data) == a["sha256"] and len(data) == a["size"]
            assert sha256_bytes(s3_server.get(bucket, f"jobs/{jid}/model/{a['path']}")) == a["sha256"]
        rep = c.get(f"/v1/merges/{jid}/report").json()
        assert rep["job_id"] == jid and rep["coverage"]["summary"]["total"] == 6

        r = c.post("/v1/merges", json=job_spec(b.replace(inputs, bucket), es))
        assert r.status_code == 422 and r.json()["error"]["field"] == "base.uri"
        assert "SUBMERGE_ALLOWED_BUCKETS" in r.json()["error"]["message"]


def test_s3_cancel_publishes_nothing(api, s3_server, checkpoints, tmp_path):
    bucket = s3_server.new_bucket("store")
    settings = service_settings(tmp_path, storage_uri=f"s3://{bucket}/p", s3_endpoint_url=s3_server.endpoint,
                                debug_step_delay=0.05)
    srv = api(settings)
    base, experts = write_family(checkpoints, shapes=MANY_SHAPES)
    with srv.client() as c:
        jid = c.post("/v1/merges", json=job_spec(base, experts)).json()["id"]
        srv.wait(c, jid, statuses=("running",), pred=lambda j: j["progress"]["done"] >= 2 and j["phase"] == "merge")
        c.post(f"/v1/merges/{jid}:cancel")
        assert srv.wait(c, jid)["status"] == "cancelled"
    assert s3_server.keys(bucket) == []
