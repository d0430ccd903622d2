"""Property-based API test: schemathesis generates requests (valid and invalid) for every operation
in openapi/openapi.json and sends them to the app under real uvicorn (embedded mode). Every answer
must conform to the document (status code, content type, body schema, headers), invalid requests
must be refused, unsupported methods answered 405 with a correct ``Allow``, and nothing may be a
5xx. Bounded: 20 examples per operation, no deadline (about 15 s on 2 cores)."""
from __future__ import annotations

from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import (allow_header_conformance, content_type_conformance,  # noqa: E402
                                 missing_required_header, negative_data_rejection, not_a_server_error,
                                 positive_data_acceptance, response_headers_conformance, response_schema_conformance,
                                 status_code_conformance, unsupported_method)

from tests.service_fixtures import service_settings, start_api_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
schema = schemathesis.openapi.from_path(REPO / "openapi" / "openapi.json")

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, negative_data_rejection, positive_data_acceptance, unsupported_method,
          allow_header_conformance, missing_required_header]
# Not used: ignored_auth (the document declares no security scheme: auth is off on loopback, and the
# auth tests are in test_service_api.py), use_after_free and ensure_resource_availability (stateful
# links between operations, which the document does not declare), max_response_time (timing on
# shared CI cores).

# positive_data_acceptance is off where schema-valid is not enough, and a 422 is the right answer:
# * the spec body operations: which `params` are valid depends on `method` (GET /v1/methods gives
#   each method's schema; one JSON schema for the body cannot tie them together), and the URIs
#   must pass the URI policy (under SUBMERGE_FILE_ROOTS here) and name checkpoints that exist;
# * GET /v1/merges with a `cursor`: a cursor is opaque, only a `next_cursor` the API returned is one.
SPEC_BODY_OPERATIONS = {"POST /v1/merges", "POST /v1/merges:validate"}


def _checks(case) -> list:
    operation = f"{case.method.upper()} {case.path}"
    if operation in SPEC_BODY_OPERATIONS or (operation == "GET /v1/merges" and (case.query or {}).get("cursor") is not None):
        return [c for c in CHECKS if c is not positive_data_acceptance]
    return CHECKS


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("schemathesis")
    # inputs only from tmp (file://): generated specs never reach the network
    srv = start_api_server(service_settings(tmp, allowed_schemes=["file"], max_attempts=1))
    yield srv
    srv.stop()


@schema.parametrize()
@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_document(case, server):
    response = case.call(base_url=server.url, timeout=30)
    case.validate_response(response, checks=_checks(case))
