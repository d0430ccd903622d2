"""`make demo` against the real service: tiny experts built offline, one evaluated merge, and the
report and artifact URLs it prints answer."""
from __future__ import annotations

import re

from scripts import demo
from tests.service_fixtures import *  # noqa: F401,F403
from tests.service_fixtures import service_settings


def test_demo_submits_an_evaluated_merge_and_prints_working_urls(api, tmp_path, capsys):
    srv = api(service_settings(tmp_path))
    assert demo.main(["--url", srv.url, "--dir", str(tmp_path / "demo"), "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "chosen alpha" in out and "normalized" in out
    urls = re.findall(r"(http://[^\s)]+)", out)
    assert any(u.endswith("/report") for u in urls) and any("/artifacts/model.safetensors" in u for u in urls), out
    with srv.client() as c:
        for url in urls:
            r = c.get(url.replace(srv.url, ""))
            assert r.status_code == 200, (url, r.status_code)
        report = c.get(next(u for u in urls if u.endswith("/report")).replace(srv.url, "")).json()
        assert len(report["evaluation"]["tasks"]) == 4 and report["method"] == "iso_c"


def test_demo_without_a_service_says_how_to_start_one(tmp_path, capsys, unused_port):
    assert demo.main(["--url", f"http://127.0.0.1:{unused_port}", "--dir", str(tmp_path / "demo")]) == 2
    assert "make run" in capsys.readouterr().err
