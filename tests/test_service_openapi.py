"""openapi/openapi.json is generated from the app (python -m service.openapi_export) and kept current."""
from __future__ import annotations

import json
from pathlib import Path

from service.openapi_export import DEFAULT_PATH, generate


def test_committed_openapi_is_up_to_date():
    path = Path(DEFAULT_PATH)
    assert path.exists(), "openapi/openapi.json is missing: run python -m service.openapi_export"
    assert path.read_text() == generate(), "openapi/openapi.json is out of date: run python -m service.openapi_export"


def test_openapi_describes_the_routes_and_the_spec_body():
    doc = json.loads(generate())
    paths = doc["paths"]
    for p in ("/v1/merges", "/v1/merges:validate", "/v1/merges/{job_id}", "/v1/merges/{job_id}:cancel",
              "/v1/merges/{job_id}/events", "/v1/merges/{job_id}/report", "/v1/merges/{job_id}/artifacts",
              "/v1/merges/{job_id}/artifacts/{path}", "/v1/methods", "/healthz", "/readyz", "/metrics"):
        assert p in paths, p
    body = paths["/v1/merges"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/MergeSpec"}
    spec = doc["components"]["schemas"]["MergeSpec"]
    assert {"method", "params", "base", "experts", "output", "callback_url"} <= set(spec["properties"])
    for ref in ("CheckpointRef", "ExpertRef", "OutputSpec"):
        assert ref in doc["components"]["schemas"]
    assert "202" in paths["/v1/merges"]["post"]["responses"]
