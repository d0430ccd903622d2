"""Build a small evaluated merge end to end and write its report.html (for docs/report-screenshot.png).

Four tiny BERT "experts" are fine-tuned for a few steps from one random-init base, each on its
own zero-shot text task (``scripts.demo.build_job``, the experts of ``make demo``), then merged with
the chosen method, α chosen on validation data, full diagnostics:

    .venv/bin/python -m scripts.demo_report --method iso_c -o /tmp/demo
    .venv/bin/python -m scripts.report_screenshot /tmp/demo/report.html -o docs/report-screenshot.png --height auto
"""
from __future__ import annotations

import argparse
import json
import os

from scripts.demo import build_job
from workers.pipeline import run_pipeline
from workers.report.report_html import render_report_html


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="iso_c")
    ap.add_argument("-o", "--out", default="/tmp/submerge-demo")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args(argv)
    root = os.path.abspath(args.out)
    spec = build_job(root, args.method, args.steps)  # the experts and tasks of `make demo`
    spec["output"] = {"uri": os.path.join(root, "merged"), "overwrite": True}
    run = run_pipeline(spec, cache_dir=os.path.join(root, "cache"))
    page = dict(run.merge.diagnostics, evaluation=run.evaluation)
    with open(os.path.join(root, "report.html"), "w") as f:
        f.write(render_report_html(page))
    with open(os.path.join(root, "evaluation.json"), "w") as f:
        json.dump(run.evaluation, f, indent=1)
    print(json.dumps({"report": os.path.join(root, "report.html"), "average": run.evaluation["average"],
                      "chosen_alpha": run.evaluation["alpha_search"]["chosen_alpha"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
