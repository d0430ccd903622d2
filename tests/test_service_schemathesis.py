"""Property-based API test: schemathesis generates requests (valid and invalid) for every operation
in openapi/openapi.json and sends them to the app under real uvicorn (embedded mode); no answer may
be a 5xx (the ``not_a_server_error`` check). Bounded: 20 examples per operation, no deadline."""
from __future__ import annotations

from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from tests.service_fixtures import service_settings, start_api_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
schema = schemathesis.openapi.from_path(REPO / "openapi" / "openapi.json")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("schemathesis")
    # inputs only from tmp (file://): generated specs never reach the network
    srv = start_api_server(service_settings(tmp, allowed_schemes=["file"], max_attempts=1))
    yield srv
    srv.stop()


@schema.parametrize()
@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_api_never_answers_5xx(case, server):
    response = case.call(base_url=server.url, timeout=30)
    case.validate_response(response, checks=[not_a_server_error])
