"""Requests the API refuses, over real HTTP (uvicorn on loopback): spec bodies that are not JSON by
their content type (415), nested deeper than MAX_JSON_DEPTH (422 invalid_json), or listing more
experts than SUBMERGE_MAX_EXPERTS (422 naming `experts`); methods a path does not have (405 with an
Allow header naming every method of the path). Every refusal has the one error shape and leaves
the keep-alive connection usable."""
from __future__ import annotations

import json

import pytest

from service.limits import MAX_JSON_DEPTH
from tests.service_fixtures import *  # noqa: F401,F403
from tests.service_fixtures import job_spec, service_settings, write_family

SPEC_ROUTES = ("/v1/merges", "/v1/merges:validate")


def _error(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert err["code"] == code, err
    return err


def _client_addr(r) -> tuple:
    return r.extensions["network_stream"].get_extra_info("client_addr")


def _still_usable(c, previous) -> None:
    """The connection that carried `previous` serves the next request (httpx would reconnect
    silently after a reset, so the client's address must be the same)."""
    r = c.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert _client_addr(r) == _client_addr(previous), "the keep-alive connection was not reused"


def _nested_params(depth: int) -> bytes:
    """A spec body nesting `depth` levels in all: the body object, then depth-1 objects in params."""
    inner = depth - 1
    return (b'{"method": "ties", "base": {"uri": "b"}, "experts": [{"uri": "x"}, {"uri": "y"}], "params": '
            + b'{"a": ' * inner + b"1" + b"}" * inner + b"}")


def test_deeply_nested_json_is_a_422_and_the_connection_stays_usable(api, tmp_path):
    srv = api(service_settings(tmp_path))
    bodies = {
        "200,000 [": b"[" * 200_000,  # json.loads raises RecursionError
        "100,000 objects in params": _nested_params(100_000),  # RecursionError too (700 kB, under the 1 MiB limit)
        "100 levels": _nested_params(100),  # parses; deeper than the limit
        f"{MAX_JSON_DEPTH + 1} levels": _nested_params(MAX_JSON_DEPTH + 1),
    }
    with srv.client() as c:
        for route in SPEC_ROUTES:
            for name, body in bodies.items():
                r = c.post(route, content=body, headers={"content-type": "application/json"})
                err = _error(r, 422, "invalid_json")
                assert f"nested deeper than {MAX_JSON_DEPTH} levels" in err["message"], (name, err)
                assert r.headers.get("connection") != "close", name
                _still_usable(c, r)
            # exactly the limit parses and goes on to spec validation (params.a is no parameter of ties)
            r = c.post(route, content=_nested_params(MAX_JSON_DEPTH), headers={"content-type": "application/json"})
            assert _error(r, 422, "invalid_spec")["field"] == "params.a"
        assert c.get("/v1/merges").json()["items"] == []
    assert MAX_JSON_DEPTH == 64


@pytest.mark.parametrize("content_type", [None, "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx", "text/json"])
def test_spec_body_that_is_not_json_by_content_type_is_415(api, checkpoints, tmp_path, content_type):
    # A web page can POST these cross-origin without a CORS preflight; on loopback auth is off.
    srv = api(service_settings(tmp_path))
    base, experts = write_family(checkpoints)
    body = json.dumps(job_spec(base, experts)).encode()
    headers = {"content-type": content_type} if content_type else {}
    with srv.client() as c:
        for route in SPEC_ROUTES:
            r = c.post(route, content=body, headers=headers)
            assert ("content-type" in r.request.headers) == (content_type is not None)
            err = _error(r, 415, "unsupported_media_type")
            assert "application/json" in err["message"] and err["field"] == "Content-Type"
            _still_usable(c, r)
        assert c.get("/v1/merges").json()["items"] == []  # nothing was submitted


def test_json_content_types_with_parameters_and_suffix_are_accepted(api, checkpoints, tmp_path):
    srv = api(service_settings(tmp_path))
    base, experts = write_family(checkpoints)
    body = json.dumps(job_spec(base, experts)).encode()
    with srv.client() as c:
        for ct in ("application/json", "application/json; charset=utf-8", "Application/JSON", "application/merge-spec+json"):
            r = c.post("/v1/merges:validate", content=body, headers={"content-type": ct})
            assert r.status_code == 200 and r.json()["valid"] is True, (ct, r.text)
        r = c.post("/v1/merges", content=body, headers={"content-type": "application/json; charset=utf-8"})
        assert r.status_code == 202, r.text
    doc = srv.app.openapi()
    for route in SPEC_ROUTES:
        assert "415" in doc["paths"][route]["post"]["responses"]


def test_more_experts_than_the_cap_is_422_naming_experts(api, checkpoints, tmp_path):
    srv = api(service_settings(tmp_path))
    assert srv.settings.max_experts == 256
    base, experts = write_family(checkpoints)
    with srv.client() as c:
        for route in SPEC_ROUTES:
            r = c.post(route, json=job_spec(base, [experts[0]] * 5000))
            err = _error(r, 422, "invalid_spec")
            assert err["field"] == "experts" and "256" in err["message"] and "SUBMERGE_MAX_EXPERTS" in err["message"], err
            assert err["details"] == [{"field": "experts", "message": err["message"]}]
            _still_usable(c, r)
        assert c.get("/v1/merges").json()["items"] == []
    schema = srv.app.openapi()["components"]["schemas"]["MergeSpec"]["properties"]["experts"]
    assert schema["maxItems"] == 256 and schema["minItems"] == 2


def test_expert_cap_follows_the_setting(api, checkpoints, tmp_path):
    srv = api(service_settings(tmp_path, max_experts=3))
    base, experts = write_family(checkpoints, n_experts=4)
    with srv.client() as c:
        r = c.post("/v1/merges:validate", json=job_spec(base, experts[:3]))
        assert r.status_code == 200 and r.json()["valid"] is True, r.text
        err = _error(c.post("/v1/merges:validate", json=job_spec(base, experts)), 422, "invalid_spec")
        assert err["field"] == "experts" and "limit of 3" in err["message"]


def test_405_allow_header_names_every_method_of_the_path(api, tmp_path):
    srv = api(service_settings(tmp_path))
    job_id = "0f2c8f6e-3c1a-4c57-9a55-7f4e0c3f5b21"
    expected = {
        "/v1/merges": {"GET", "POST"},  # list and submit: two routes, one path
        f"/v1/merges/{job_id}": {"GET"},
        f"/v1/merges/{job_id}:cancel": {"POST"},  # not also GET /v1/merges/{job_id} with job_id "<id>:cancel"
        "/v1/merges:validate": {"POST"},
    }
    with srv.client() as c:
        for path, methods in expected.items():
            for method in ("OPTIONS", "DELETE", "PUT", "PATCH"):
                r = c.request(method, path)
                err = _error(r, 405, "method_not_allowed")
                assert err["message"]
                assert {m.strip() for m in r.headers["allow"].split(",")} == methods, (method, path, r.headers["allow"])
            _still_usable(c, r)
        assert c.post(f"/v1/merges/{job_id}").headers["allow"] == "GET"
        assert c.get(f"/v1/merges/{job_id}:cancel").headers["allow"] == "POST"
        assert _error(c.get(f"/v1/merges/{job_id}"), 404, "not_found")  # the routes themselves still answer
