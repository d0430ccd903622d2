"""Screenshot a merge report (``report.html`` from ``workers.report.report_html``) with headless Chromium.

    python -m scripts.report_screenshot report.html -o report.png [--size 1280x3000 | --width 1280 --height auto]

``--height auto`` measures the laid-out page first and shoots all of it. Chromium is looked up as in
``scripts/chromium.py`` (``$SUBMERGE_CHROMIUM``, chromium, chromium-browser, google-chrome); pass
``--install`` to let it ``apt-get install chromium`` (root, Debian) when none is found.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `scripts` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.chromium import ensure_chromium, page_height, screenshot  # noqa: E402


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 1280x3000, got {text!r}") from None
    if not (100 <= w <= 10000 and 100 <= h <= 30000):
        raise argparse.ArgumentTypeError(f"size out of range: {text!r}")
    return w, h


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html", type=Path, help="report.html to render")
    ap.add_argument("-o", "--output", type=Path, help="PNG to write (default: next to the HTML, .png)")
    ap.add_argument("--size", type=_size, default=(1280, 3000), help="window WIDTHxHEIGHT in CSS px (default 1280x3000)")
    ap.add_argument("--width", type=int, help="window width (overrides --size)")
    ap.add_argument("--height", help="window height in px, or 'auto' for the whole page (overrides --size)")
    ap.add_argument("--install", action="store_true", help="apt-get install chromium once if none is found (root, Debian)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per Chromium run (default 60)")
    args = ap.parse_args(argv)

    if not args.html.is_file():
        ap.error(f"no such file: {args.html}")
    binary, reason = ensure_chromium(install=args.install)
    if binary is None:
        print(f"report_screenshot: no headless Chromium: {reason}", file=sys.stderr)
        return 2
    width, height = args.size
    if args.width:
        width = args.width
    if args.height == "auto":
        measured = page_height(binary, args.html, width=width, timeout=args.timeout)
        if measured is None:
            print("report_screenshot: could not measure the page; using the default height", file=sys.stderr)
        else:
            height = max(100, min(measured, 30000))
    elif args.height:
        height = int(args.height)
    out = args.output or args.html.with_suffix(".png")
    try:
        png = screenshot(binary, args.html, out, size=(width, height), timeout=args.timeout)
    except RuntimeError as e:
        print(f"report_screenshot: {e}", file=sys.stderr)
        return 1
    print(f"{png} ({width}x{height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
