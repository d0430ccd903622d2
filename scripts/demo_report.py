"""Build a small evaluated merge end to end and write its report.html (for docs/report-screenshot.png).

Four tiny BERT "experts" are fine-tuned for a few steps from one random-init base, each on its
own zero-shot text task (tests/tiny_bert.py builds the models and data offline), then merged with
the chosen method, α chosen on validation data, full diagnostics:

    .venv/bin/python -m scripts.demo_report --method iso_c -o /tmp/demo
    .venv/bin/python -m scripts.report_screenshot /tmp/demo/report.html -o docs/report-screenshot.png --height auto
"""
from __future__ import annotations

import argparse
import json
import os


def main(argv: list[str] | None = None) -> int:
    from evaluation.evaluators import zero_shot_head
    from evaluation.models import load_model
    from workers.pipeline import run_pipeline
    from tests.tiny_bert import finetune_zero_shot, make_task_rows, make_tiny_bert, perturb_checkpoint, write_jsonl
    from workers.report.report_html import render_report_html

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="iso_c")
    ap.add_argument("-o", "--out", default="/tmp/submerge-demo")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args(argv)
    root = args.out
    os.makedirs(root, exist_ok=True)
    base = make_tiny_bert(os.path.join(root, "base"), seed=0, hidden=64, layers=3)
    base_model = load_model(base, device="cpu")
    # four tasks over the same two word classes, told apart by their prompts
    tasks = {"animals": ["animal", "colour"], "colours": ["colour", "animal"],  # conflicts with "animals": the merge cannot serve both
             "nature": ["a photo of an animal", "a photo of a colour"], "reviews": ["a good review", "a bad review"]}
    experts, specs = [], []
    for i, (name, labels) in enumerate(tasks.items()):
        rows = make_task_rows(160, seed=i)
        for split, part in (("validation", rows[80:120]), ("test", rows[120:])):
            write_jsonl(os.path.join(root, f"{name}_{split}.jsonl"), part)
        d = perturb_checkpoint(base, os.path.join(root, name), seed=i, scale=0.0)
        finetune_zero_shot(d, zero_shot_head(base_model, labels).clone(), rows[:80], steps=args.steps, seed=i,
                           lr=2e-3, batch_size=16)
        experts.append({"uri": d, "name": name})
        specs.append({"expert": name, "labels": labels, "test": {"uri": os.path.join(root, f"{name}_test.jsonl")},
                      "validation": {"uri": os.path.join(root, f"{name}_validation.jsonl")}})
    spec = {"method": args.method, "params": {"alpha": "auto"}, "base": {"uri": base}, "experts": experts,
            "output": {"uri": os.path.join(root, "merged"), "overwrite": True}, "options": {"diagnostics": "full"},
            "evaluation": {"tasks": specs}}
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
