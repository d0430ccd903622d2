"""Write the API's OpenAPI document: ``python -m service.openapi_export [path]`` (default openapi/openapi.json).

The document does not depend on settings or environment; tests/test_service_openapi.py fails when
the committed file is out of date.
"""
from __future__ import annotations

import json
import os
import sys

from service.app import create_app
from workers.config import Settings

DEFAULT_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "openapi", "openapi.json")


def generate() -> str:
    app = create_app(Settings(_env_file=None, data_dir="/nonexistent", auth="off", redis_url=None, database_url=None,
                              storage_uri=None, api_keys=[]))
    return json.dumps(app.openapi(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else DEFAULT_PATH
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(generate())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
