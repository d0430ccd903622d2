"""Headless-Chromium helpers for tests that must see a page the way a browser does.

The Chromium lookup/installation and the launch itself live in ``scripts/chromium.py`` (shared with
``scripts/report_screenshot.py``); this module adds the test-side probe: a copy of the page with a
small script that, on ``load``, checks every ``<img>`` (``complete && naturalWidth > 0``, ``decode()``,
and a few pixels drawn on a canvas) and writes the result as JSON into ``<pre id="probe">``, which
``--dump-dom`` then prints.
"""
from __future__ import annotations

import html as _html
import json
import re
import tempfile
import time
from pathlib import Path

from scripts.chromium import ensure_chromium, run_chromium

_state: dict[str, str | None] = {}


def chromium_path() -> str | None:
    """A headless Chromium, installed once (Debian's package) if missing; None when there is none."""
    if "path" not in _state:
        path, reason = ensure_chromium(install=True)
        _state["path"], _state["reason"] = path, reason
    return _state["path"]


def chromium_unavailable_reason() -> str:
    """Why :func:`chromium_path` is None (or how the binary was found)."""
    chromium_path()
    return _state.get("reason") or ""


PROBE_ID = "probe"

# Runs on window `load` (all <img> data: URIs fetched) and writes its result synchronously: an
# earlier version waited on img.decode() promises, which can settle after --dump-dom has printed the
# page under CPU load (the probe then "never ran"). A data: image that failed to decode is complete
# with naturalWidth 0; drawing each image onto a canvas decodes it synchronously, and counting the
# distinct colours of a 32×32 thumbnail tells a blank image from a plot.
PROBE_SCRIPT = r"""
<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  function colours(im) {
    try {
      var c = document.createElement("canvas"); c.width = 32; c.height = 32;
      var g = c.getContext("2d"); g.drawImage(im, 0, 0, 32, 32);
      var d = g.getImageData(0, 0, 32, 32).data, seen = {};
      for (var i = 0; i < d.length; i += 4) seen[d[i] + "," + d[i + 1] + "," + d[i + 2] + "," + d[i + 3]] = 1;
      return Object.keys(seen).length;
    } catch (e) { return -1; }
  }
  var rows = imgs.map(function (im) {
    var r = im.getBoundingClientRect();
    var decoded = im.complete && im.naturalWidth > 0 && im.naturalHeight > 0;
    return {alt: im.alt, complete: im.complete, naturalWidth: im.naturalWidth, naturalHeight: im.naturalHeight,
            decoded: decoded, ok: decoded, shownWidth: Math.round(r.width),
            shownHeight: Math.round(r.height), colours: decoded ? colours(im) : 0};
  });
  var res = {loaded: true, title: document.title, count: imgs.length,
             ok: rows.filter(function (r) { return r.ok; }).length,
             headings: Array.prototype.map.call(document.querySelectorAll("h1, h2"), function (h) {
               return {tag: h.tagName.toLowerCase(), text: h.textContent.trim()}; }),
             sections: Array.prototype.map.call(document.querySelectorAll("section[id]"), function (s) { return s.id; }),
             images: rows, scrollHeight: document.documentElement.scrollHeight};
  var pre = document.createElement("pre");
  pre.id = "probe"; pre.style.display = "none"; pre.textContent = JSON.stringify(res);
  document.body.appendChild(pre);
});
</script>
"""

_PROBE_RE = re.compile(r'<pre id="probe"[^>]*>(.*?)</pre>', re.S)


def inject_probe(page: str) -> str:
    """The page with the probe script before its last ``</body>`` (or at the end)."""
    i = page.lower().rfind("</body>")
    return page + PROBE_SCRIPT if i < 0 else page[:i] + PROBE_SCRIPT + page[i:]


def count_img_tags(page: str) -> int:
    return len(re.findall(r"<img\b", page, re.I))


def render_in_browser(html_path: str | Path, *, screenshot: str | None = None, size: tuple[int, int] = (1280, 2400),
                      probe: bool = True, timeout: float = 60.0) -> dict:
    """Open ``html_path`` in headless Chromium (``--dump-dom``, virtual time 5 s) and report what it saw.

    With ``probe`` (default) a copy of the page with :data:`PROBE_SCRIPT` injected is opened, and
    ``result["probe"]`` is the probe's JSON (None if it never ran). ``screenshot`` additionally writes
    a PNG of the original page at ``size``. Raises RuntimeError when there is no Chromium.
    """
    binary = chromium_path()
    if binary is None:
        raise RuntimeError(f"no headless Chromium: {chromium_unavailable_reason()}")
    src = Path(html_path)
    page = src.read_text(encoding="utf-8")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="submerge-probe-") as tmp:
        target = src
        if probe:
            target = Path(tmp) / src.name
            target.write_text(inject_probe(page), encoding="utf-8")
        cp = run_chromium(binary, target, dump_dom=True, size=size, virtual_time_budget_ms=5000, timeout=timeout)
    dom = cp.stdout or ""
    m = _PROBE_RE.search(dom)
    found = json.loads(_html.unescape(m.group(1))) if m else None
    title = re.search(r"<title>(.*?)</title>", dom, re.S)
    out = {"binary": binary, "returncode": cp.returncode, "dom": dom, "probe": found,
           "title": _html.unescape(title.group(1)) if title else None,
           "img_tags_in_source": count_img_tags(page), "stderr_tail": (cp.stderr or "")[-2000:],
           "seconds": round(time.monotonic() - t0, 2), "screenshot": None}
    if screenshot:
        from scripts.chromium import screenshot as _shot
        out["screenshot"] = str(_shot(binary, src, screenshot, size=size, timeout=timeout))
        out["seconds"] = round(time.monotonic() - t0, 2)
    return out


__all__ = ["PROBE_SCRIPT", "chromium_path", "chromium_unavailable_reason", "count_img_tags", "inject_probe", "render_in_browser"]
