"""Logs of `submerge serve`: one access line per request in the app's log format, with no secrets,
and no "--- Logging error ---" (the redacting record factory used to drop the arguments that
uvicorn's access formatter unpacks). The server is the real command in a subprocess."""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from uvicorn.logging import AccessFormatter

from tests.service_fixtures import free_loopback_port, wait_serving
from workers.redact import install_log_redaction, redact_query

REPO = Path(__file__).resolve().parents[1]
SECRETS = ("SIGSECRET123", "CREDSECRET456", "STSSECRET789", "TOKSECRET321", "ATSECRET654", "BEARERSECRET987", "PWSECRET111")
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
ACCESS = re.compile(rf'^{STAMP} INFO submerge\.access: 127\.0\.0\.1:\d+ - "(?P<method>[A-Z]+) (?P<target>\S+) HTTP/1\.1" '
                    rf'(?P<status>\d{{3}}) \d+\.\d ms$')


def _record(msg, args):
    """A record made by the installed factory, as logger.info(msg, *args) would make it."""
    return logging.getLogRecordFactory()("uvicorn.access", logging.INFO, __file__, 1, msg, args, None)


def test_redacting_factory_keeps_the_arguments_formatters_need():
    install_log_redaction()
    access = AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s', use_colors=False)
    fmt = '%s - "%s %s HTTP/%s" %d'
    # no secret: the record is untouched, uvicorn's formatter gets its five arguments
    rec = _record(fmt, ("127.0.0.1:1", "GET", "/healthz", "1.1", 200))
    assert rec.args == ("127.0.0.1:1", "GET", "/healthz", "1.1", 200)
    assert access.format(rec) == '127.0.0.1:1 - "GET /healthz HTTP/1.1" 200 OK'
    # a secret in one argument: that argument is redacted, the others stay
    rec = _record(fmt, ("127.0.0.1:1", "GET", f"http://h/x?X-Amz-Signature={SECRETS[0]}", "1.1", 200))
    assert len(rec.args) == 5 and access.format(rec) == '127.0.0.1:1 - "GET http://h/x HTTP/1.1" 200 OK'
    # mapping arguments
    rec = _record("%(who)s sent %(what)s", ({"who": "client", "what": f"Bearer {SECRETS[5]}"},))
    assert rec.args == {"who": "client", "what": "Bearer [redacted]"} and rec.getMessage() == "client sent Bearer [redacted]"

    class Secretive:  # a secret inside a non-string argument: only collapsing removes it
        def __str__(self):
            return f"Bearer {SECRETS[5]}"
    rec = _record("got %s", (Secretive(),))
    assert rec.args == () and rec.getMessage() == "got Bearer [redacted]"
    # redacting the template changes its placeholders (the URL's query goes): collapse as well
    rec = _record("fetch http://h/%s?sig=%s", ("p", SECRETS[0]))
    assert rec.args == () and rec.getMessage() == "fetch http://h/p"


def test_redact_query():
    assert redact_query("a=1&X-Amz-Signature=s&X-Amz-Credential=c&X-Amz-Security-Token=t&b=&flag") == \
        "a=1&X-Amz-Signature=[redacted]&X-Amz-Credential=[redacted]&X-Amz-Security-Token=[redacted]&b=&flag"
    assert redact_query("Signature=s&sig=s&token=t&access_token=t&api_key=k&password=p&status=queued&limit=5") == \
        "Signature=[redacted]&sig=[redacted]&token=[redacted]&access_token=[redacted]&api_key=[redacted]&" \
        "password=[redacted]&status=queued&limit=5"


def _serve(tmp_path: Path, stderr, **env_extra) -> tuple[subprocess.Popen, str]:
    port = free_loopback_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUBMERGE_")}
    env.update(SUBMERGE_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
               **env_extra)
    submerge = Path(sys.executable).parent / "submerge"  # the installed console script, as users run it
    cmd = [str(submerge)] if submerge.exists() else [sys.executable, "-m", "service.cli"]
    proc = subprocess.Popen([*cmd, "serve", "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=stderr)
    return proc, f"http://127.0.0.1:{port}"


def _wait_ready(proc, url) -> int:
    """Poll /healthz until it answers; returns how many polls got an answer (each one is logged)."""
    wait_serving(proc, url)
    return 1


def _stop(proc) -> None:
    proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_submerge_serve_logs_one_redacted_access_line_per_request(tmp_path):
    log_path = tmp_path / "stderr.log"
    with open(log_path, "wb") as stderr:
        proc, url = _serve(tmp_path, stderr)
        try:
            polls = _wait_ready(proc, url)
            s = SECRETS
            requests = [  # (method, target as sent, target as logged, expected status, extra request arguments)
                ("GET", "/healthz?probe=1", "/healthz?probe=1", 200, {}),
                ("GET", "/v1/methods", "/v1/methods", 200, {"headers": {"Authorization": f"Bearer {s[5]}"}}),
                ("GET", f"/v1/merges?status=queued&X-Amz-Signature={s[0]}&X-Amz-Credential={s[1]}&X-Amz-Security-Token={s[2]}",
                 "/v1/merges?status=queued&X-Amz-Signature=[redacted]&X-Amz-Credential=[redacted]&X-Amz-Security-Token=[redacted]",
                 200, {}),
                ("GET", f"/v1/merges?token={s[3]}&access_token={s[4]}&limit=5", "/v1/merges?token=[redacted]&access_token=[redacted]&limit=5",
                 200, {"headers": {"Authorization": f"Bearer {s[5]}"}}),
                ("POST", "/v1/merges:validate", "/v1/merges:validate", 415, {"content": b"{}", "headers": {"content-type": "text/plain"}}),
                ("POST", "/v1/merges:validate", "/v1/merges:validate", 422,
                 {"json": {"method": "ties", "base": {"uri": f"http://u:{s[6]}@example.org/b?sig={s[0]}"}, "experts": []}}),
                ("GET", "/v1/merges/no-such-job", "/v1/merges/no-such-job", 404, {}),
                ("OPTIONS", "/v1/merges", "/v1/merges", 405, {}),
                ("GET", "/v1/merges/a%20b%22c", "/v1/merges/a%20b%22c", 404, {}),
            ]
            with httpx.Client(base_url=url, timeout=30) as c:
                for method, target, _, status, kw in requests:
                    r = c.request(method, target, **kw)
                    assert r.status_code == status, (target, r.text)
        finally:
            _stop(proc)
    err = log_path.read_text(errors="replace")
    assert "Logging error" not in err and "Traceback" not in err, err[:3000]
    for secret in SECRETS:
        assert secret not in err, f"{secret} in the log:\n{err}"
    lines = [ln for ln in err.splitlines() if "submerge.access" in ln]
    assert all(ACCESS.match(ln) for ln in lines), "\n".join(ln for ln in lines if not ACCESS.match(ln))
    assert len(lines) == polls + len(requests), "\n".join(lines)
    logged = [(m["method"], m["target"], int(m["status"])) for m in map(ACCESS.match, lines)]
    for method, _, target, status, _ in requests:
        assert logged.count((method, target, status)) == 1, (method, target, status, "\n".join(lines))
    # uvicorn's own lines have the same format, and its access log is off (no second line per request)
    assert re.search(rf"^{STAMP} INFO uvicorn\.error: Application startup complete\.$", err, re.M), err
    assert "uvicorn.access" not in err and err.count("/healthz?probe=1") == 1, err


def test_access_log_can_be_turned_off(tmp_path):
    log_path = tmp_path / "stderr.log"
    with open(log_path, "wb") as stderr:
        proc, url = _serve(tmp_path, stderr, SUBMERGE_ACCESS_LOG="false")
        try:
            _wait_ready(proc, url)
            with httpx.Client(base_url=url, timeout=30) as c:
                assert c.get("/v1/methods").status_code == 200
        finally:
            _stop(proc)
    err = log_path.read_text(errors="replace")
    assert "Application startup complete" in err and "Logging error" not in err
    assert "submerge.access" not in err and "/v1/methods" not in err, err
