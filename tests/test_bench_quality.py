"""bench/quality on tiny inputs: the task loader/splitter, the fine-tuning recipe on a tiny BERT,
the expert cache, and the QUALITY.md writer. The real benchmark is `make bench-quality`."""
from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from bench.quality import report as qreport
from bench.quality.finetune import Recipe, finetune, load_base, mean_pool, prompt_head, train_expert
from bench.quality.tasks import Task, class_name, load_task, load_tasks, split_train, write_splits
from tests.tiny_bert import make_task_rows, make_tiny_bert


def _task_file(path, n_train=60, n_test=20, seed=0, dup=True):
    rows = make_task_rows(n_train + n_test, seed=seed)
    train = [[r["text"], r["label"]] for r in rows[:n_train]]
    if dup:  # the same text twice must land in one split only
        train.append(list(train[0]))
    test = [[r["text"], r["label"]] for r in rows[n_train:]]
    path.write_text(json.dumps({"labels": ["animal", "colour"], "train": train, "test": test}))
    return path


# ------------------------------------------------------------------------------------------
# tasks


def test_split_is_deterministic_and_disjoint(tmp_path):
    f = _task_file(tmp_path / "toy.json")
    a, b = load_task(f, val_size=10, seed=3), load_task(f, val_size=10, seed=3)
    assert (a.train, a.validation, a.test) == (b.train, b.validation, b.test)
    assert not {t for t, _ in a.train} & {t for t, _ in a.validation}
    data = json.loads(f.read_text())
    assert sorted(map(tuple, data["train"])) == sorted(a.train + a.validation)  # nothing lost, nothing added
    assert sorted(map(tuple, data["test"])) == sorted(a.test)                   # test is only shuffled
    assert len({t for t, _ in a.validation}) == 10
    c = load_task(f, val_size=10, seed=4)
    assert c.validation != a.validation


def test_split_train_keeps_duplicates_together():
    rows = [("x", 0), ("y", 1), ("x", 0), ("z", 1), ("w", 0)]
    train, val = split_train(rows, 2, seed=0)
    assert len(train) + len(val) == len(rows)
    assert not {t for t, _ in train} & {t for t, _ in val}


def test_tasks_in_file_order_and_prompts(tmp_path):
    for name in ("lang_id", "bbc_topic", "wn_noun_supersense"):
        _task_file(tmp_path / f"{name}.json")
    tasks = load_tasks(tmp_path, val_size=5)
    assert [t.name for t in tasks] == ["bbc_topic", "lang_id", "wn_noun_supersense"]
    assert tasks[0].prompt == "a news article about {label}"
    assert class_name("lang_id", "de") == "German"
    assert class_name("wn_noun_supersense", "noun.animal") == "animal"
    assert class_name("vader_word_sentiment", "neg") == "negative"
    assert class_name("bbc_topic", "sports") == "sports"


def test_write_splits_reads_back_with_the_service_loader(tmp_path):
    from evaluation.data import load_rows, read_labels, read_texts
    task = load_task(_task_file(tmp_path / "toy.json"), val_size=8)
    files = write_splits(task, tmp_path / "out", calib_size=4)
    rows = load_rows(files["validation"])
    assert read_texts(rows, "text", uri="v") == [t for t, _ in task.validation]
    assert read_labels(rows, "label", task.class_names, uri="v") == [y for _, y in task.validation]
    calib = [json.loads(line) for line in open(files["calibration"])]
    assert calib == [{"text": t} for t, _ in task.train[:4]]
    mtime = (tmp_path / "out" / "toy" / "test.jsonl").stat().st_mtime_ns
    write_splits(task, tmp_path / "out", calib_size=4)  # unchanged content is not rewritten
    assert (tmp_path / "out" / "toy" / "test.jsonl").stat().st_mtime_ns == mtime


# ------------------------------------------------------------------------------------------
# fine-tuning


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("bq")
    base = make_tiny_bert(d / "base", seed=0)
    rows = make_task_rows(64, seed=1)
    task = Task(name="toy", raw_labels=["animal", "colour"], class_names=["animal", "colour"],
                prompt="a photo of {label}", train=[(r["text"], r["label"]) for r in rows], validation=[], test=[])
    return d, base, task


RECIPE = Recipe(steps=24, lr=2e-3, warmup_steps=2, batch_size=16, max_length=16, dropout=False)


def test_training_lowers_the_loss_and_leaves_head_and_embeddings(tiny):
    _, base, task = tiny
    model, tok = load_base(base)
    head = prompt_head(model, tok, task.class_names, task.prompt, RECIPE.max_length)
    head0 = head.clone()
    emb0 = {n: p.detach().clone() for n, p in model.named_parameters() if "embeddings" in n and "LayerNorm" not in n}
    w0 = model.encoder.layer[0].attention.self.query.weight.detach().clone()
    losses = train_expert(model, tok, task.train, head, RECIPE)
    assert len(losses) == RECIPE.steps
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    assert torch.equal(head, head0) and not head.requires_grad
    for n, p in model.named_parameters():
        if n in emb0:
            assert torch.equal(p, emb0[n]), n
            assert not p.requires_grad
    assert not torch.equal(model.encoder.layer[0].attention.self.query.weight, w0)


def test_finetune_saves_an_hf_dir_and_hits_the_cache(tiny):
    d, base, task = tiny
    out = finetune(base, task, d / "experts", RECIPE, log=None)
    assert out["cached"] is False and out["loss_last"] < out["loss_first"]
    base_t, exp_t = load_file(f"{base}/model.safetensors"), load_file(f"{out['path']}/model.safetensors")
    assert set(base_t) == set(exp_t)
    for k, v in base_t.items():
        assert exp_t[k].dtype == v.dtype
        if "embeddings" in k and "LayerNorm" not in k:
            assert torch.equal(exp_t[k], v), k                      # tables frozen: zero task vector
    assert any(not torch.equal(exp_t[k], base_t[k]) for k in base_t if k.endswith("dense.weight"))

    # the service's evaluator runs the saved expert exactly like training did (same pooling, same head)
    from evaluation.evaluators import zero_shot_head
    from evaluation.models import TextModel
    ev_base, ev_exp = TextModel.load(base, device="cpu"), TextModel.load(out["path"], device="cpu")
    ref_model, tok = load_base(base)
    head = prompt_head(ref_model, tok, task.class_names, task.prompt, RECIPE.max_length)
    assert torch.allclose(zero_shot_head(ev_base, task.class_names, task.prompt, max_length=RECIPE.max_length), head,
                          atol=1e-5)
    texts = [t for t, _ in task.train[:8]]
    trained, _ = load_base(out["path"])
    with torch.no_grad():
        enc = tok(texts, padding=True, truncation=True, max_length=RECIPE.max_length, return_tensors="pt")
        ours = mean_pool(trained(**enc).last_hidden_state, enc["attention_mask"])
    assert torch.allclose(ev_exp.embed(texts, max_length=RECIPE.max_length), ours, atol=1e-5)

    t0 = time.perf_counter()
    again = finetune(base, task, d / "experts", RECIPE, log=None)
    assert again["cached"] is True and again["path"] == out["path"] and time.perf_counter() - t0 < 2
    other = finetune(base, task, d / "experts", Recipe(**{**RECIPE.__dict__, "steps": 2}), log=None)
    assert other["cached"] is False and other["path"] != out["path"]


# ------------------------------------------------------------------------------------------
# the report


def _rec(T, key, mode, accs, experts, base, alpha=None):
    tasks = [{"task": f"t{i}", "merged": a, "base": b, "expert_accuracy": e, "normalized": a / e}
             for i, (a, e, b) in enumerate(zip(accs, experts, base))]
    mean = lambda k: sum(t[k] for t in tasks) / len(tasks)  # noqa: E731
    ev = {"tasks": tasks, "average": {k: mean(k) for k in ("merged", "base", "expert_accuracy", "normalized")}}
    if mode == "auto":
        ev["alpha_search"] = {"search": "grid", "chosen_alpha": alpha, "curve": [{"alpha": alpha}] * 3}
    return {"format": "submerge.bench-quality/1", "T": T, "key": key, "label": key, "method": key, "alpha_mode": mode,
            "alpha": alpha, "status": "succeeded", "wall_s": 12.3, "timings_s": {"merge": 10.0, "evaluation": 2.0},
            "evaluation": ev}


def test_report_tables(tmp_path):
    E, B = [0.9, 0.8], [0.5, 0.4]
    recs = [_rec(2, "task_arithmetic", "auto", [0.7, 0.6], E, B, alpha=0.4),
            _rec(2, "task_arithmetic", "default", [0.6, 0.6], E, B, alpha=0.3),
            _rec(2, "tsv_m", "auto", [0.8, 0.7], E, B, alpha=1.2),
            _rec(2, "weight_average", "default", [0.55, 0.45], E, B, alpha=1.0),
            {**_rec(2, "ties", "auto", [0, 0], E, B), "status": "failed", "evaluation": None,
             "error": {"code": "numerical_failure", "message": "boom"}}]
    text = qreport.render(recs, {"Ts": [2]}, command="make bench-quality")
    # papers' format: accuracy (normalized) in %
    ta_norm = 100 * (0.7 / 0.9 + 0.6 / 0.8) / 2
    assert f"| Task Arithmetic | 65.0 ({ta_norm:.1f}) |" in text
    assert "| Zero-shot (pretrained) | 45.0 (" in text
    assert "| Individual (fine-tuned experts) | 85.0 (100.0) |" in text
    assert "| Weight averaging (no α) | 50.0 (" in text
    assert "| TIES | — |" in text                                    # failed: no number invented
    assert "numerical_failure" in text and "T = 2, ESM, α auto: not run" in text
    assert "| TSV-M | 80.0 | 70.0 | **75.0** |" in text               # per-task table
    assert "| Task Arithmetic | 0.3 | 0.4 |" in text                  # default α, chosen α
    assert "TSV-M above TA and TIES at T = 2 | n/a" in text            # TIES missing: not judged
    assert "`make bench-quality`" in text
    assert "TALL-mask λ" not in text                                # no λ search among the records
    cons = _rec(2, "consensus", "auto", [0.7, 0.7], E, B, alpha=0.5)
    cons["evaluation"]["lambda_search"] = {"chosen_lambda": {"t0": 0.2, "t1": 0.5}}
    cons["timings_s"]["lambda_search"] = 7.0
    text = qreport.render(recs + [cons], {"Ts": [2]}, command="make bench-quality")
    assert "| 2 | t0 0.2, t1 0.5 |" in text and "λ search 7" in text
    # the file writer: markdown + plot
    rd = tmp_path / "results"
    rd.mkdir()
    for r in recs:
        (rd / f"T{r['T']}_{r['key']}_{r['alpha_mode']}.json").write_text(json.dumps(r))
    (rd / "run.json").write_text(json.dumps({"Ts": [2]}))
    qreport.write_report(rd, tmp_path / "QUALITY.md", command="x")
    assert (rd / qreport.PLOT_NAME).stat().st_size > 1000
    assert f"](results/{qreport.PLOT_NAME})" in (tmp_path / "QUALITY.md").read_text()


def test_ordering_checks():
    E, B = [0.9], [0.5]
    recs = [_rec(8, k, "auto", [a], E, B, alpha=1.0) for k, a in
            (("task_arithmetic", 0.6), ("ties", 0.62), ("tsv_m", 0.7), ("iso_c", 0.69), ("iso_cts", 0.68),
             ("esm", 0.71), ("task_arithmetic_boost", 0.65), ("ties_boost", 0.6))]
    checks = {c: ok for c, ok, _ in qreport.ordering_checks(qreport.Results(recs))}
    assert checks["TSV-M above TA and TIES at T = 8"] is True
    assert checks["Iso-CTS ≥ Iso-C at T = 8"] is False
    assert checks["Subspace Boosting lifts Task Arithmetic at T = 8"] is True
    assert checks["Subspace Boosting lifts TIES at T = 8"] is False
    assert checks["ESM at or near the top at T = 8 (within 1 point of the best)"] is True
