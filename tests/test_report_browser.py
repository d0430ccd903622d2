"""The HTML merge report (workers/report/report_html.py) opened in a real browser: a small real TSV-M merge
with diagnostics, ``render_report_html``, then headless Chromium (tests/browser.py) with a probe that
checks every plot image actually decoded. Without Chromium the browser test skips loudly; the
structural checks on the HTML (each plot a valid, non-blank PNG) run regardless."""
from __future__ import annotations

import base64
import io
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import merging

pytest.importorskip("matplotlib")
from workers.report.report_html import render_report_html  # noqa: E402

WIDTH = 32
BLOCKS = 4
N_TASKS = 4
SHAPES = {"attn.in_proj_weight": (3 * WIDTH, WIDTH), "attn.out_proj.weight": (WIDTH, WIDTH),
          "mlp.c_fc.weight": (4 * WIDTH, WIDTH), "mlp.c_proj.weight": (WIDTH, 4 * WIDTH)}
# Plot sections and the fewest <img> each must hold (similarity: cosine heatmap, HO-GSVD heatmap).
EXPECTED_SECTIONS = {"similarity": 2, "spectra": 1, "sar-sti": 1, "rank": 1}


def make_checkpoints(root: Path, seed: int = 0) -> dict:
    """A tiny CLIP-like ViT (``visual.transformer.resblocks.*``) and ``N_TASKS`` experts whose task
    vectors are low rank with decaying spectra, part shared and part task-specific, plus a little
    noise, so the spectra, SAR/STI and similarity plots have something to show."""
    g = torch.Generator().manual_seed(seed)
    base = {"visual.class_embedding": torch.randn(WIDTH, generator=g),
            "visual.positional_embedding": torch.randn(10, WIDTH, generator=g)}
    for b in range(BLOCKS):
        for name, shape in SHAPES.items():
            base[f"visual.transformer.resblocks.{b}.{name}"] = torch.randn(*shape, generator=g) / shape[1] ** 0.5
        base[f"visual.transformer.resblocks.{b}.ln_1.weight"] = torch.ones(WIDTH)
    save_file(base, str(root / "base.safetensors"))

    def low_rank(shape, rank, scale):
        u = torch.linalg.qr(torch.randn(shape[0], rank, generator=g))[0]
        v = torch.linalg.qr(torch.randn(shape[1], rank, generator=g))[0]
        s = scale * torch.logspace(0, -1.5, rank)
        return (u * s) @ v.T

    shared = {k: low_rank(v.shape, 4, 0.12) for k, v in base.items() if v.ndim == 2}
    for t in range(N_TASKS):
        expert = {}
        for k, v in base.items():
            if v.ndim == 2:
                tau = 0.6 * shared[k] + low_rank(v.shape, 8, 0.08 * (1 + 0.25 * t)) + 0.002 * torch.randn(*v.shape, generator=g)
            else:
                tau = 0.01 * torch.randn(*v.shape, generator=g)
            expert[k] = v + tau
        save_file(expert, str(root / f"task{t}.safetensors"))
    return base


def merge_spec(root: Path, out: Path) -> dict:
    return {"method": "tsv_m", "params": {"alpha": 1.0}, "base": {"uri": str(root / "base.safetensors")},
            "experts": [{"uri": str(root / f"task{t}.safetensors"), "name": f"task{t}"} for t in range(N_TASKS)],
            "output": {"uri": str(out)}, "options": {"diagnostics": "full", "device": "cpu"}}


def write_report(root: Path) -> Path:
    """Checkpoints, a real merge, and its report.html under ``root``; returns the report's path."""
    root.mkdir(parents=True, exist_ok=True)
    make_checkpoints(root)
    res = merging.merge(merge_spec(root, root / "out"))
    assert res.diagnostics and res.diagnostics["errors"] == []
    path = root / "report.html"
    path.write_text(render_report_html(res.diagnostics), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: thread hand-offs would dominate
    try:
        return write_report(tmp_path_factory.mktemp("report"))
    finally:
        torch.set_num_threads(prev)


def _section(page: str, sid: str) -> str:
    start = page.index(f'<section id="{sid}">')
    return page[start:page.index("</section>", start)]


def test_report_html_structure_and_embedded_pngs(report):
    """No browser needed: the page is whole, every plot section is there and every <img> is a valid, non-blank PNG."""
    from PIL import Image

    page = report.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<title>Merge diagnostics: tsv_m</title>" in page
    assert "<h1>Merge diagnostics: <code>tsv_m</code></h1>" in page
    for sid, n in EXPECTED_SECTIONS.items():
        assert _section(page, sid).count("<img ") >= n, sid
    srcs = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
    assert len(srcs) == page.count("<img") >= sum(EXPECTED_SECTIONS.values())
    for data in srcs:
        im = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        im.load()
        assert im.format == "PNG" and im.width > 100 and im.height > 100
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100  # drawn on, not a blank canvas


def _require_chromium() -> None:
    """Skip (loudly: a warning in pytest's summary as well as the skip reason) when there is no Chromium."""
    from tests.browser import chromium_path, chromium_unavailable_reason

    if chromium_path() is None:
        reason = ("!!! THE HTML REPORT WAS NOT CHECKED IN A BROWSER !!! no headless Chromium: "
                  f"{chromium_unavailable_reason()} (set $SUBMERGE_CHROMIUM to a chromium/chrome binary)")
        warnings.warn(reason, stacklevel=2)
        pytest.skip(reason)


def test_report_renders_in_headless_chromium(report, tmp_path):
    from tests.browser import render_in_browser

    _require_chromium()
    page = report.read_text(encoding="utf-8")
    seen = render_in_browser(report, screenshot=str(tmp_path / "report.png"), size=(1280, 2400))
    probe = seen["probe"]
    assert probe is not None, f"the probe never ran (rc {seen['returncode']}): {seen['stderr_tail']}"
    assert probe["loaded"] and probe["title"] == seen["title"] == "Merge diagnostics: tsv_m"

    n_tags = page.count("<img")
    assert probe["count"] == n_tags == seen["img_tags_in_source"] >= sum(EXPECTED_SECTIONS.values())
    broken = [im for im in probe["images"] if not (im["complete"] and im["naturalWidth"] > 0 and im["decoded"])]
    assert not broken, f"images the browser could not decode: {broken}"
    assert probe["ok"] == probe["count"]
    for im in probe["images"]:
        assert im["naturalHeight"] > 0 and im["shownWidth"] > 0 and im["shownHeight"] > 0, im  # laid out, not hidden
        assert im["colours"] > 2, im  # pixels drawn, read back through a canvas

    headings = [h["text"] for h in probe["headings"]]
    assert headings[0] == "Merge diagnostics: tsv_m"
    for want in ("Task similarity", "Spectra before and after merging",
                 "Subspace alignment (SAR) and singular task interference (STI) per layer",
                 "Truncation energy and rank collapse"):
        assert want in headings
    assert set(EXPECTED_SECTIONS) <= set(probe["sections"])
    alts = [im["alt"] for im in probe["images"]]
    for alt in ("singular value spectra", "SAR and STI per layer", "Cosine similarity of task vectors (whole model)"):
        assert alt in alts

    shot = Path(seen["screenshot"])
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    with Image.open(shot) as im:
        assert im.size == (1280, 2400)


def test_browser_probe_flags_an_undecodable_image(report, tmp_path):
    """The probe is not a rubber stamp: a corrupted data: PNG shows up as not decoded."""
    from tests.browser import render_in_browser

    _require_chromium()
    page = report.read_text(encoding="utf-8")
    good = re.search(r'<img alt="[^"]*" src="data:image/png;base64,[^"]+">', page).group(0)
    bad = '<img alt="corrupt" src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB">'
    path = tmp_path / "mixed.html"
    path.write_text(f"<!DOCTYPE html><html><head><title>t</title></head><body>{good}{bad}</body></html>", encoding="utf-8")
    probe = render_in_browser(path)["probe"]
    assert probe["count"] == 2 and probe["ok"] == 1
    assert [im["alt"] for im in probe["images"] if not im["decoded"]] == ["corrupt"]
