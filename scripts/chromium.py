"""Find (or install, once) a headless Chromium and run it on a local HTML file.

Shared by ``scripts/report_screenshot.py`` and the browser tests (``tests/browser.py``); it only
uses the standard library, so a script or a test can import it without the project's extras.

Lookup order: ``$SUBMERGE_CHROMIUM``, then ``chromium``, ``chromium-browser``, ``google-chrome``
(``google-chrome-stable``) on ``PATH`` or in ``/usr/bin``. When none is found, :func:`ensure_chromium`
tries once to install Debian's ``chromium`` package (``apt-get install -y --no-install-recommends
chromium``, as root, non-interactive, with a timeout; ``apt-get update`` and a retry only when the
first install fails). The attempt is serialised with a file lock and a failed attempt is recorded in
a marker file, so concurrent or later runs neither race apt nor retry it every time; delete the
marker (``install_marker()``) or set ``SUBMERGE_CHROMIUM_RETRY_INSTALL=1`` to try again, and set
``SUBMERGE_CHROMIUM_NO_INSTALL=1`` to never try.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ENV_PATH = "SUBMERGE_CHROMIUM"
ENV_NO_INSTALL = "SUBMERGE_CHROMIUM_NO_INSTALL"
ENV_RETRY = "SUBMERGE_CHROMIUM_RETRY_INSTALL"
NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_TIMEOUT_S = 900.0

# Flags for a headless run in a container: no sandbox (root, no user namespaces), no GPU, no first-run
# chrome, nothing talking to the network on its own.
BASE_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
              "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--mute-audio", "--force-device-scale-factor=1")

_install_result: tuple[bool, str] | None = None  # one attempt per process, whatever the marker says


def _executable(p: str | os.PathLike | None) -> str | None:
    if p and os.path.isfile(p) and os.access(p, os.X_OK):
        return str(p)
    return None


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary, or None. Installs nothing."""
    env = os.environ.get(ENV_PATH)
    if env:
        return _executable(env) or _executable(shutil.which(env))
    for name in NAMES:
        hit = _executable(shutil.which(name)) or _executable(f"/usr/bin/{name}")
        if hit:
            return hit
    return None


def install_marker() -> Path:
    return Path(tempfile.gettempdir()) / "submerge-chromium-install.json"


def _apt(args: list[str], deadline: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", NEEDRESTART_MODE="a")
    left = max(1.0, deadline - time.monotonic())
    return subprocess.run(["apt-get", "-q", "-o", "DPkg::Lock::Timeout=120", *args], env=env, capture_output=True, text=True,
                          timeout=left, stdin=subprocess.DEVNULL)


def _tail(cp: subprocess.CompletedProcess, n: int = 300) -> str:
    text = ((cp.stderr or "") + (cp.stdout or "")).strip().replace("\n", " | ")
    return text[-n:]


def install_chromium(timeout: float = INSTALL_TIMEOUT_S) -> tuple[bool, str]:
    """Try once to install Debian's ``chromium``. Returns (installed, message)."""
    global _install_result
    if _install_result is not None:
        return _install_result
    if os.environ.get(ENV_NO_INSTALL):
        return False, f"installing chromium is disabled (${ENV_NO_INSTALL} is set)"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False, "no chromium and not root, so `apt-get install chromium` was not attempted"
    if not shutil.which("apt-get"):
        return False, "no chromium and no apt-get to install it with"
    marker = install_marker()
    lock_path = marker.with_suffix(".lock")
    import fcntl

    with open(lock_path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent process may be installing it right now
        try:
            if find_chromium():
                _install_result = (True, "chromium was installed by another process")
                return _install_result
            if marker.exists() and not os.environ.get(ENV_RETRY):
                try:
                    prev = json.loads(marker.read_text())
                except (OSError, ValueError):
                    prev = {}
                _install_result = (False, f"an earlier attempt to install chromium failed ({prev.get('reason', '?')}); "
                                          f"delete {marker} or set ${ENV_RETRY}=1 to try again")
                return _install_result
            t0 = time.monotonic()
            deadline = t0 + timeout
            steps = []
            try:
                cp = _apt(["install", "-y", "--no-install-recommends", "chromium"], deadline)
                steps.append(f"install: rc {cp.returncode}")
                if cp.returncode != 0:
                    up = _apt(["update"], deadline)
                    steps.append(f"update: rc {up.returncode}")
                    cp = _apt(["install", "-y", "--no-install-recommends", "chromium"], deadline)
                    steps.append(f"install: rc {cp.returncode}")
                ok = cp.returncode == 0 and find_chromium() is not None
                reason = "; ".join(steps) + ("" if ok else f"; {_tail(cp)}")
            except subprocess.TimeoutExpired:
                ok, reason = False, "; ".join(steps + [f"apt-get timed out after {timeout:.0f} s"])
            except OSError as e:
                ok, reason = False, "; ".join(steps + [f"apt-get could not run: {e}"])
            took = time.monotonic() - t0
            if ok:
                marker.unlink(missing_ok=True)
                _install_result = (True, f"installed Debian's chromium in {took:.0f} s")
            else:
                marker.write_text(json.dumps({"reason": reason, "seconds": round(took, 1), "time": time.time()}))
                _install_result = (False, f"`apt-get install chromium` failed after {took:.0f} s: {reason}")
            return _install_result
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_chromium(install: bool = True) -> tuple[str | None, str]:
    """(path, message): the binary, installing it once if allowed; path None and the reason otherwise."""
    path = find_chromium()
    if path:
        return path, f"found {path}"
    if os.environ.get(ENV_PATH):
        return None, f"${ENV_PATH}={os.environ[ENV_PATH]!r} is not an executable"
    if not install:
        return None, "no chromium, chromium-browser or google-chrome found"
    ok, msg = install_chromium()
    path = find_chromium() if ok else None
    return path, msg if path else f"no chromium, chromium-browser or google-chrome found; {msg}"


def chromium_command(binary: str, url: str, *, dump_dom: bool = False, screenshot: str | os.PathLike | None = None,
                     size: tuple[int, int] | None = None, virtual_time_budget_ms: int | None = 5000,
                     user_data_dir: str | None = None) -> list[str]:
    cmd = [binary, *BASE_FLAGS]
    if user_data_dir:
        cmd.append(f"--user-data-dir={user_data_dir}")
    if virtual_time_budget_ms:
        cmd.append(f"--virtual-time-budget={int(virtual_time_budget_ms)}")
    if size:
        cmd.append(f"--window-size={int(size[0])},{int(size[1])}")
    if screenshot:
        cmd.append(f"--screenshot={os.fspath(screenshot)}")
    if dump_dom:
        cmd.append("--dump-dom")
    cmd.append(url)
    return cmd


def run_chromium(binary: str, html_path: str | os.PathLike, *, dump_dom: bool = False, screenshot: str | os.PathLike | None = None,
                 size: tuple[int, int] | None = None, virtual_time_budget_ms: int | None = 5000,
                 timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Open a local HTML file headless with a throw-away profile (so concurrent runs do not share one)."""
    url = Path(html_path).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="submerge-chromium-") as profile:
        cmd = chromium_command(binary, url, dump_dom=dump_dom, screenshot=screenshot, size=size,
                               virtual_time_budget_ms=virtual_time_budget_ms, user_data_dir=profile)
        env = dict(os.environ, HOME=profile)  # crashpad/fontconfig caches go to the throw-away dir
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env)


_HEIGHT_SCRIPT = ('<script>window.addEventListener("load",function(){var p=document.createElement("pre");'
                  'p.id="submerge-page-height";p.textContent=String(document.documentElement.scrollHeight);'
                  'document.body.appendChild(p);});</script>')


def page_height(binary: str, html_path: str | os.PathLike, width: int = 1280, timeout: float = 60.0) -> int | None:
    """The page's laid-out height in CSS pixels at ``width`` (a copy with a tiny script, ``--dump-dom``); None if unknown."""
    import re

    page = Path(html_path).read_text(encoding="utf-8")
    i = page.lower().rfind("</body>")
    page = page + _HEIGHT_SCRIPT if i < 0 else page[:i] + _HEIGHT_SCRIPT + page[i:]
    with tempfile.TemporaryDirectory(prefix="submerge-height-") as tmp:
        copy = Path(tmp) / Path(html_path).name
        copy.write_text(page, encoding="utf-8")
        cp = run_chromium(binary, copy, dump_dom=True, size=(width, 1000), timeout=timeout)
    m = re.search(r'<pre id="submerge-page-height">(\d+)</pre>', cp.stdout or "")
    return int(m.group(1)) if m else None


def screenshot(binary: str, html_path: str | os.PathLike, png_path: str | os.PathLike, size: tuple[int, int] = (1280, 3000),
               virtual_time_budget_ms: int = 5000, timeout: float = 60.0) -> Path:
    """Write a PNG of ``html_path`` rendered at ``size``; raises RuntimeError when Chromium writes none."""
    png = Path(png_path).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    cp = run_chromium(binary, html_path, screenshot=png, size=size, virtual_time_budget_ms=virtual_time_budget_ms, timeout=timeout)
    if not png.is_file() or png.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot (rc {cp.returncode}): {(cp.stderr or '')[-800:]}")
    return png


__all__ = ["BASE_FLAGS", "NAMES", "chromium_command", "ensure_chromium", "find_chromium", "install_chromium", "install_marker",
           "page_height", "run_chromium", "screenshot"]
