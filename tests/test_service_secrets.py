"""No secrets in job records or logs: credentials and query strings (presigned signatures) of input
and callback URIs, bearer tokens and the webhook secret never appear in what the API returns for a
job (spec, error, events, result) nor in any log record."""
from __future__ import annotations

import logging

from workers.redact import redact_text
from tests.service_fixtures import *  # noqa: F401,F403
from tests.service_fixtures import API_KEYS, TOKENS, job_spec, service_settings, write_family

SECRETS = ("s3cr3tPassw0rd", "SIGNATURE0123456789", "AKIAFAKEKEY", "cbtoken987654", "whsec-secret-value-1234")


def test_redact_text_units():
    assert redact_text("GET https://u:p@host/x.bin?X-Amz-Signature=abc#f failed") == "GET https://host/x.bin failed"
    assert redact_text("Authorization: Bearer tok-123") == "Authorization: [redacted]"
    assert redact_text("header bearer tok-123 sent") == "header bearer [redacted] sent"
    assert redact_text("/plain/path and file:///a/b.safetensors") == "/plain/path and file:///a/b.safetensors"
    assert redact_text("store sqlite:////tmp/d/submerge.db?mode=ro ready") == "store sqlite:////tmp/d/submerge.db ready"


def _no_secret(text: str, where: str) -> None:
    for s in SECRETS + tuple(TOKENS.values()):
        assert s not in text, f"{s!r} leaked into {where}: ...{text[max(0, text.find(s) - 200):text.find(s) + 50]}..."


def test_secrets_never_in_job_record_or_logs(api, checkpoints, tmp_path, serve_http, caplog):
    caplog.set_level(logging.DEBUG)
    base, experts = write_family(checkpoints)
    http = serve_http(checkpoints.root)
    host = http.url.split("://", 1)[1]
    presigned = f"http://{host}/e1.safetensors?X-Amz-Credential={SECRETS[2]}&X-Amz-Signature={SECRETS[1]}"
    with_password = f"http://reader:{SECRETS[0]}@{host}/e1.safetensors"
    missing = f"http://{host}/missing.safetensors?X-Amz-Signature={SECRETS[1]}"
    settings = service_settings(tmp_path, auth="on", api_keys=API_KEYS, webhook_secret=SECRETS[4],
                                allowed_private_networks=["127.0.0.1/32"])
    srv = api(settings)
    callback = f"http://127.0.0.1:9/hook?token={SECRETS[3]}"  # nothing listens: delivery fails and is logged
    with srv.client(TOKENS["tenantA"]) as c:
        r = c.post("/v1/merges", json=job_spec(base, [experts[0], with_password]))
        assert r.status_code == 422 and r.json()["error"]["code"] == "uri_not_allowed"  # user:pass@ is refused outright
        _no_secret(r.text, "the 422 answer")
        ids = []
        for uri in (presigned, missing):
            r = c.post("/v1/merges", json=job_spec(base, [experts[0], uri], callback_url=callback))
            assert r.status_code == 202, r.text
            _no_secret(r.text, "the submit answer")
            ids.append(r.json()["id"])
        r = c.post("/v1/merges:validate", json=job_spec(base, [experts[0], missing]))
        _no_secret(r.text, "the validate answer")
        jobs = [srv.wait(c, i, timeout=60) for i in ids]
        assert jobs[1]["status"] == "failed" and jobs[1]["error"]["code"] == "unreadable_uri", jobs[1]
        assert jobs[0]["spec"]["experts"][1]["uri"] == f"http://{host}/e1.safetensors"
        for i in ids:
            _no_secret(c.get(f"/v1/merges/{i}").text, "GET /v1/merges/{id}")
            _no_secret(c.get(f"/v1/merges/{i}/events").text, "the events")
        _no_secret(c.get("/v1/merges").text, "the job list")
        if jobs[0]["status"] == "succeeded":
            _no_secret(c.get(f"/v1/merges/{ids[0]}/report").text, "report.json")
        # the webhook attempt for each job failed (and was logged) before we look at the logs
        srv.wait(c, ids[1], pred=lambda j: any(e["type"] in ("webhook_failed", "webhook_delivered")
                                               for e in c.get(f"/v1/merges/{ids[1]}/events").json()["items"]), timeout=30)
    text = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records) + caplog.text
    assert caplog.records, "nothing was logged"
    _no_secret(text, "the logs")
