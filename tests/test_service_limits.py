"""Request bodies over SUBMERGE_MAX_REQUEST_BYTES are refused with 413 request_too_large, whether
declared by Content-Length or streamed without one (chunked)."""
from __future__ import annotations

import json

from tests.service_fixtures import *  # noqa: F401,F403
from tests.service_fixtures import service_settings


def _assert_413(r):
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["code"] == "request_too_large" and "SUBMERGE_MAX_REQUEST_BYTES" in err["message"]


def test_request_body_limit_content_length_and_chunked(api, tmp_path):
    srv = api(service_settings(tmp_path, max_request_bytes=2048))
    big = json.dumps({"method": "task_arithmetic", "pad": "x" * 5000}).encode()
    with srv.client() as c:
        for route in ("/v1/merges", "/v1/merges:validate"):
            # Repeated on one keep-alive connection: the refused body is drained, so the client gets
            # the 413 (not a connection reset) and the connection stays usable.
            for _ in range(20):
                r = c.post(route, content=big, headers={"content-type": "application/json"})
                _assert_413(r)
                assert r.headers.get("connection") != "close"

            def chunks():  # no Content-Length: Transfer-Encoding: chunked
                for i in range(0, len(big), 512):
                    yield big[i:i + 512]
            r = c.post(route, content=chunks(), headers={"content-type": "application/json"})
            assert "content-length" not in r.request.headers and r.request.headers.get("transfer-encoding") == "chunked"
            _assert_413(r)
        # under the limit the request goes through to spec validation as usual
        small = c.post("/v1/merges", json={"method": "task_arithmetic"})
        assert small.status_code == 422 and small.json()["error"]["code"] == "invalid_spec"

        def small_chunks():
            yield b'{"method": '
            yield b'"task_arithmetic"}'
        r = c.post("/v1/merges", content=small_chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_spec"
        assert c.get("/healthz").status_code == 200


def test_default_limit_is_one_mib(tmp_path):
    from workers.config import Settings
    assert Settings(_env_file=None).max_request_bytes == 1 << 20
