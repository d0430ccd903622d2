"""The job pipeline on tiny real transformers models: evaluation numbers equal a direct computation,
params.alpha = "auto" picks the best grid point of the official search, ESM runs from raw samples
(captured statistics, cached), per-task classification heads, progress phases, and the service
serving the evaluation in report.json / report.html."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.tiny_bert import finetune_zero_shot, make_task_rows, make_tiny_bert, perturb_checkpoint, write_jsonl

transformers = pytest.importorskip("transformers")

LABELS_A = ["animal", "colour"]
LABELS_B = ["colour", "animal"]  # the same texts with the classes swapped: a task that conflicts with A


# -- direct computations, independent of evaluation/ ---------------------------------------------------

def _hf(model_dir, state=None, cls=None):
    cls = cls or transformers.BertModel
    model = cls.from_pretrained(model_dir, local_files_only=True).eval()
    if state is not None:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=False)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return model, tok


@torch.no_grad()
def _embed(model, tok, texts):
    out = []
    for t in texts:  # one at a time: no padding at all
        enc = tok([t], return_tensors="pt", truncation=True, max_length=128)
        h = model(**enc, output_hidden_states=True).hidden_states[-1][0]
        out.append(torch.nn.functional.normalize(h.mean(0), dim=0))
    return torch.stack(out)


def _zero_shot_acc(model, tok, head, rows):
    emb = _embed(model, tok, [r["text"] for r in rows])
    pred = (emb @ head.T).argmax(1)
    return float((pred == torch.tensor([r["label"] for r in rows])).float().mean())


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalfam")
    base = make_tiny_bert(root / "base", seed=0)
    model, tok = _hf(base)
    heads = {name: _embed(model, tok, labels) for name, labels in (("A", LABELS_A), ("B", LABELS_B))}
    data = {}
    for name, seed in (("A", 1), ("B", 2)):
        rows = make_task_rows(48, seed=seed)
        data[name] = {"train": rows[:24], "validation": rows[24:36], "test": rows[36:]}
        for split in ("validation", "test"):
            write_jsonl(root / f"{name}_{split}.jsonl", data[name][split])
    experts = {}
    for i, name in enumerate(("A", "B")):
        d = perturb_checkpoint(base, root / f"expert{name}", seed=10 + i, scale=0.0)
        finetune_zero_shot(d, heads[name], data[name]["train"], steps=25, seed=i, lr=3e-3, batch_size=8)
        experts[name] = d
    write_jsonl(root / "unlabeled.jsonl", [{"text": r["text"]} for r in data["A"]["train"] + data["B"]["train"]])
    return {"root": root, "base": base, "experts": experts, "heads": heads, "data": data}


def _task(fam, name, validation=True):
    t = {"expert": name, "test": {"uri": str(fam["root"] / f"{name}_test.jsonl")},
         "labels": LABELS_A if name == "A" else LABELS_B, "prompt": "{label}"}
    if validation:
        t["validation"] = {"uri": str(fam["root"] / f"{name}_validation.jsonl")}
    return t


def _spec(fam, out, **over):
    spec = {"method": "task_arithmetic", "params": {"alpha": 0.5}, "base": {"uri": fam["base"]},
            "experts": [{"uri": fam["experts"][n], "name": n} for n in ("A", "B")],
            "output": {"uri": str(fam["root"] / out)}, "options": {"diagnostics": "off"},
            "evaluation": {"tasks": [_task(fam, "A"), _task(fam, "B")]}}
    spec.update(over)
    return spec


def test_alpha_auto_picks_the_best_grid_point_and_accuracies_are_direct(family, tmp_path):
    from workers.pipeline import run_pipeline
    fam = family
    events = []
    run = run_pipeline(_spec(fam, "auto", params={"alpha": "auto"}), progress=events.append, cache_dir=str(tmp_path))
    ev = run.evaluation
    search = ev["alpha_search"]
    assert search["search"]["kind"] == "grid" and len(search["curve"]) == 30  # TA: {1/30, ..., 1}

    # every curve point is what θ0 + α·(τ_A + τ_B) scores, computed directly
    base_sd = load_file(f"{fam['base']}/model.safetensors")
    taus = {n: {k: v - base_sd[k] for k, v in load_file(f"{d}/model.safetensors").items() if v.is_floating_point()}
            for n, d in fam["experts"].items()}
    expert_val = {}
    for n in ("A", "B"):
        m, tok = _hf(fam["experts"][n])
        expert_val[n] = _zero_shot_acc(m, tok, fam["heads"][n], fam["data"][n]["validation"])
    assert search["expert_validation_accuracy"] == pytest.approx(expert_val)
    model, tok = _hf(fam["base"])
    for point in search["curve"][::6]:  # a sample of the 30 points keeps the test quick
        a = point["alpha"]
        state = {k: base_sd[k] + a * (taus["A"][k] + taus["B"][k]) for k in taus["A"]}
        model.load_state_dict(state, strict=False)
        for n in ("A", "B"):
            assert point["per_task"][n] == pytest.approx(_zero_shot_acc(model, tok, fam["heads"][n], fam["data"][n]["validation"])), (a, n)
    best = max(search["curve"], key=lambda p: p["avg_normalized"])
    assert search["chosen_alpha"] == best["alpha"] == run.merge.manifest["params"]["alpha"]

    # test accuracies of the published model, the base and the experts, directly
    merged_sd = load_file(str(fam["root"] / "auto" / "model.safetensors"))
    m, tok = _hf(fam["base"], merged_sd)
    base_m, _ = _hf(fam["base"])
    for row in ev["tasks"]:
        n = row["task"]
        test = fam["data"][n]["test"]
        assert row["merged"] == pytest.approx(_zero_shot_acc(m, tok, fam["heads"][n], test))
        assert row["base"] == pytest.approx(_zero_shot_acc(base_m, tok, fam["heads"][n], test))
        em, _ = _hf(fam["experts"][n])
        assert row["expert_accuracy"] == pytest.approx(_zero_shot_acc(em, tok, fam["heads"][n], test))
        assert row["normalized"] == pytest.approx(row["merged"] / row["expert_accuracy"])
        assert row["n_test"] == len(test)
    assert ev["average"]["merged"] == pytest.approx(sum(r["merged"] for r in ev["tasks"]) / 2)
    for w in ("A", "B"):  # the fine-tuned experts beat the base on their own task: the fixture is meaningful
        row = next(r for r in ev["tasks"] if r["task"] == w)
        assert row["expert_accuracy"] > row["base"]

    phases = []
    for e in events:
        if not phases or phases[-1] != e.phase:
            phases.append(e.phase)
    assert phases[0] == "evaluation setup" and phases[-1] == "evaluation"
    for p in ("merge", "alpha search", "finalize", "publish", "evaluation"):
        assert p in phases
    ends = [e for e in events if e.phase == "evaluation"]
    assert ends[-1].done == ends[-1].total and all(0 <= e.done <= e.total for e in ends)


def test_consensus_lambda_auto_is_the_official_tall_mask_step(family, tmp_path):
    """Each expert's λ is the first best of {0.2 … 0.6} for θ0 + m_t(λ) ⊙ Σ τ on its task's
    validation split (scores recomputed directly), and the merge runs with those λs."""
    import merging
    from workers.pipeline import run_pipeline
    fam = family
    events = []
    run = run_pipeline(_spec(fam, "tall", method="consensus", params={"lambda": "auto", "alpha": 0.7, "k": 1}),
                       progress=events.append, cache_dir=str(tmp_path))
    search = run.evaluation["lambda_search"]
    assert search["grid"] == [0.2, 0.3, 0.4, 0.5, 0.6]

    base_sd = load_file(f"{fam['base']}/model.safetensors")
    taus = {n: {k: v - base_sd[k] for k, v in load_file(f"{d}/model.safetensors").items() if v.is_floating_point()}
            for n, d in fam["experts"].items()}
    model, tok = _hf(fam["base"])
    distinct = set()
    for n, other in (("A", "B"), ("B", "A")):
        points = search["validation_accuracy"][n]
        assert [p["lambda"] for p in points] == search["grid"]
        for p in points:  # with two experts, Σ τ − τ_t is the other expert's task vector
            lam = p["lambda"]
            state = {k: base_sd[k] + torch.where(taus[n][k].abs() > lam * taus[other][k].abs(), taus[n][k] + taus[other][k], 0.0)
                     for k in taus[n]}
            model.load_state_dict(state, strict=False)
            assert p["accuracy"] == pytest.approx(_zero_shot_acc(model, tok, fam["heads"][n], fam["data"][n]["validation"])), (n, lam)
        best = max(p["accuracy"] for p in points)
        assert search["chosen_lambda"][n] == next(p["lambda"] for p in points if p["accuracy"] == best)
        distinct |= {p["accuracy"] for p in points}
    assert len(distinct) > 1  # λ changes the scores on this fixture: the choice is not vacuous

    chosen = [search["chosen_lambda"][n] for n in ("A", "B")]
    assert run.merge.manifest["spec"]["params"]["lambda"] == chosen
    direct = merging.merge({"method": "consensus", "params": {"lambda": chosen, "alpha": 0.7, "k": 1},
                            "base": {"uri": fam["base"]}, "experts": [{"uri": fam["experts"][n], "name": n} for n in ("A", "B")],
                            "output": {"uri": str(tmp_path / "direct")}, "options": {"diagnostics": "off"}})
    got = load_file(str(fam["root"] / "tall" / "model.safetensors"))
    want = load_file(f"{direct.output_uri}/model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    phases = [e.phase for e in events]
    assert phases.index("lambda search") < phases.index("merge")
    assert run.evaluation["timings_s"]["lambda_search"] > 0


def test_consensus_lambda_auto_needs_validation_data_for_every_expert(family):
    import merging
    from merging.errors import SpecError
    from merging.spec import load_spec
    fam = family
    no_eval = _spec(fam, "x", method="consensus", params={"lambda": "auto"})
    del no_eval["evaluation"]
    with pytest.raises(SpecError, match=r"params.lambda: 'auto' chooses lambda on validation data, but the spec has no evaluation section"):
        load_spec(no_eval)
    one_task = _spec(fam, "x", method="consensus", params={"lambda": "auto"})
    one_task["evaluation"]["tasks"] = one_task["evaluation"]["tasks"][:1]
    with pytest.raises(SpecError, match=r"params.lambda: .* expert 'B' has no evaluation task"):
        load_spec(one_task)
    with pytest.raises(SpecError, match=r"params.lambda: 'auto' is chosen on validation data before the merge"):
        merging.merge(_spec(fam, "x", method="consensus", params={"lambda": "auto"}))
    assert not (fam["root"] / "x").exists()


def test_baselines_are_cached_and_bad_task_data_fails_before_merging(family, tmp_path):
    from workers.pipeline import run_pipeline
    from merging.errors import MergeError
    fam = family
    run_pipeline(_spec(fam, "c1"), cache_dir=str(tmp_path))
    n_cached = len(list((tmp_path / "eval" / "scores").iterdir()))
    assert n_cached == 4  # base and expert, two tasks, test split
    run_pipeline(_spec(fam, "c2"), cache_dir=str(tmp_path))
    assert len(list((tmp_path / "eval" / "scores").iterdir())) == n_cached

    bad = fam["root"] / "bad.jsonl"
    bad.write_text('{"text": "cat dog", "label": 0}\n{"text": "red", "label": "purple"}\n')
    spec = _spec(fam, "c3")
    spec["evaluation"]["tasks"][0]["test"] = {"uri": str(bad)}
    with pytest.raises(MergeError) as e:
        run_pipeline(spec, cache_dir=str(tmp_path))
    assert e.value.code == "invalid_task_data" and "bad.jsonl" in str(e.value) and "purple" in str(e.value)
    assert not (fam["root"] / "c3").exists()


def test_esm_from_raw_samples_equals_esm_from_captured_statistics(family, tmp_path):
    from evaluation.capture import capture_gram, save_calibration
    from evaluation.models import load_model
    from workers.pipeline import run_pipeline
    from merging import merge
    fam = family
    unlabeled = str(fam["root"] / "unlabeled.jsonl")
    texts = [json.loads(line)["text"] for line in open(unlabeled)][:16]
    spec = _spec(fam, "esm_raw", method="esm", params={}, evaluation=None, options={"diagnostics": "off", "compute_dtype": "float64"})
    for e in spec["experts"]:
        e["calibration"] = {"data": {"uri": unlabeled}, "samples": 16, "max_length": 64}
    events = []
    run = run_pipeline(spec, progress=events.append, cache_dir=str(tmp_path))
    assert [r["cached"] for r in run.calibration] == [False, False]
    assert any(e.phase == "calibration" for e in events)

    files = {}
    for n, d in fam["experts"].items():
        stats = capture_gram(load_model(d, device="cpu"), texts, max_length=64)
        files[n] = str(tmp_path / f"{n}.safetensors")
        save_calibration(stats, files[n])
    ref = dict(spec, output={"uri": str(fam["root"] / "esm_ref")},
               experts=[{"uri": fam["experts"][n], "name": n, "calibration": {"uri": files[n]}} for n in ("A", "B")])
    merge(ref)
    got, want = (load_file(str(fam["root"] / o / "model.safetensors")) for o in ("esm_raw", "esm_ref"))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)
    again = run_pipeline(dict(spec, output={"uri": str(fam["root"] / "esm_raw2")}), cache_dir=str(tmp_path))
    assert [r["cached"] for r in again.calibration] == [True, True]


def test_sequence_classification_scores_each_task_with_its_own_head(tmp_path):
    from workers.pipeline import run_pipeline
    base = make_tiny_bert(tmp_path / "base", seed=3, num_labels=2)
    experts = {}
    for i, (n, labels) in enumerate((("A", 2), ("B", 3))):
        d = perturb_checkpoint(base, tmp_path / n, seed=20 + i, scale=0.05)
        sd = load_file(f"{d}/model.safetensors")
        g = torch.Generator().manual_seed(i)
        sd["classifier.weight"] = torch.randn(labels, sd["classifier.weight"].shape[1], generator=g)
        sd["classifier.bias"] = torch.randn(labels, generator=g)
        save_file(sd, f"{d}/model.safetensors", metadata={"format": "pt"})
        cfg = json.loads(open(f"{d}/config.json").read())
        cfg["id2label"] = {str(j): f"L{j}" for j in range(labels)}
        cfg["label2id"] = {f"L{j}": j for j in range(labels)}
        open(f"{d}/config.json", "w").write(json.dumps(cfg))
        rows = [{"text": r["text"], "label": j % labels} for j, r in enumerate(make_task_rows(20, seed=i))]
        write_jsonl(tmp_path / f"{n}.jsonl", rows)
        experts[n] = (d, rows)
    spec = {"method": "task_arithmetic", "params": {"alpha": 0.5}, "base": {"uri": base},
            "experts": [{"uri": experts[n][0], "name": n} for n in ("A", "B")], "output": {"uri": str(tmp_path / "out")},
            "options": {"diagnostics": "off"},
            "evaluation": {"evaluator": "sequence_classification", "baselines": False,
                           "tasks": [{"expert": n, "test": {"uri": str(tmp_path / f"{n}.jsonl")}} for n in ("A", "B")]}}
    run = run_pipeline(spec, cache_dir=str(tmp_path / "cache"))
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    rows = {r["key"]: r for r in run.merge.manifest["tensors"]}
    assert rows["classifier.weight"]["action"] == "copied"  # heads are kept out of the merge
    for row in run.evaluation["tasks"]:
        d, data = experts[row["task"]]
        model, tok = _hf(d, {k: v for k, v in merged.items() if not k.startswith("classifier.")},
                         cls=transformers.BertForSequenceClassification)
        with torch.no_grad():
            pred = [int(model(**tok([r["text"]], return_tensors="pt")).logits.argmax()) for r in data]
        assert row["merged"] == pytest.approx(sum(p == r["label"] for p, r in zip(pred, data)) / len(data))
        assert "base" not in row and set(run.evaluation["average"]) == {"merged"}


# -- through the service ------------------------------------------------------------------------------

from tests.service_fixtures import api, service_settings  # noqa: E402,F401


def test_service_job_with_evaluation_and_alpha_auto(api, family, tmp_path):  # noqa: F811
    fam = family
    srv = api(service_settings(tmp_path, file_roots=[str(tmp_path), str(fam["root"])]))
    body = _spec(fam, "unused", params={"alpha": "auto"}, options={"device": "cpu"})
    del body["output"]
    with srv.client() as c:
        # auto without validation data: a 422 that names the field, before anything runs
        bad = json.loads(json.dumps(body))
        del bad["evaluation"]["tasks"][1]["validation"]
        r = c.post("/v1/merges", json=bad)
        assert r.status_code == 422 and "evaluation.tasks.1.validation" in r.json()["error"]["message"]
        # a data URI outside the allowed roots is refused by name
        outside = json.loads(json.dumps(body))
        outside["evaluation"]["tasks"][0]["test"]["uri"] = "/etc/passwd"
        r = c.post("/v1/merges", json=outside)
        assert r.status_code in (400, 403, 422) and "evaluation.tasks.0.test.uri" in r.text

        r = c.post("/v1/merges", json=body)
        assert r.status_code == 202, r.text
        job = srv.wait(c, r.json()["id"], timeout=120)
        assert job["status"] == "succeeded", job
        phases = [e["data"]["phase"] for e in c.get(f"/v1/merges/{job['id']}/events").json()["items"] if e["type"] == "phase"]
        assert "evaluation setup" in phases and "alpha search" in phases and phases[-1] == "evaluation"
        rep = c.get(f"/v1/merges/{job['id']}/report").json()
        ev = rep["evaluation"]
        assert {t["task"] for t in ev["tasks"]} == {"A", "B"} and ev["alpha_search"]["chosen_alpha"] == rep["params"]["alpha"]
        html = c.get(f"/v1/merges/{job['id']}/report?format=html")
        assert html.status_code == 200 and 'id="evaluation"' in html.text and 'alt="alpha curve"' in html.text


def test_cli_merge_runs_the_pipeline(family, tmp_path, capsys, monkeypatch):
    import yaml

    from service.cli import main
    fam = family
    monkeypatch.setenv("SUBMERGE_CACHE_DIR", str(tmp_path / "cache"))
    spec = _spec(fam, "unused", params={"alpha": "auto"})
    spec["output"] = {"uri": str(tmp_path / "cli_out")}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(["merge", str(tmp_path / "spec.yaml"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "(chosen on validation data)" in out and "accuracy  merged" in out
    assert main(["merge", str(tmp_path / "spec.yaml"), "--quiet", "--json", "--overwrite"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["evaluation"]["alpha_search"]["chosen_alpha"] == summary["params"]["alpha"]
    assert {t["task"] for t in summary["evaluation"]["tasks"]} == {"A", "B"}

    tall = _spec(fam, "unused", method="consensus", params={"lambda": "auto", "alpha": 0.5})
    tall["output"] = {"uri": str(tmp_path / "cli_tall")}
    (tmp_path / "tall.yaml").write_text(yaml.safe_dump(tall))
    assert main(["merge", str(tmp_path / "tall.yaml"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"lambda    A 0\.[2-6], B 0\.[2-6] \(TALL masks, chosen on validation data\)", out), out


def test_preflight_accepts_samples_to_capture_and_merge_alone_names_them(family, tmp_path):
    from merging import merge
    from merging import preflight
    from merging.errors import CalibrationError
    fam = family
    spec = _spec(fam, "pf", method="esm", params={}, evaluation=None)
    spec["experts"][0]["calibration"] = {"data": {"uri": str(fam["root"] / "unlabeled.jsonl")}}
    spec["experts"][1]["calibration"] = {"data": {"uri": str(fam["root"] / "unlabeled.jsonl")}}
    assert preflight(spec).output_problem is None  # what /v1/merges:validate and `submerge validate` run
    with pytest.raises(CalibrationError, match="expert 'A': calibration.data holds samples"):
        merge(spec)  # the bare library cannot run models: it says so, by expert
    spec["experts"][1]["calibration"] = None
    with pytest.raises(CalibrationError, match="expert 'B' has no calibration"):
        preflight(spec)


def test_report_html_with_evaluation_only(family, tmp_path):
    """diagnostics off, evaluation on: the worker still writes report.html, evaluation first."""
    from workers.pipeline import run_pipeline
    from workers.report.report_html import render_report_html
    run = run_pipeline(_spec(family, "html_only", params={"alpha": "auto"}), cache_dir=str(tmp_path))
    assert run.merge.diagnostics is None
    page = render_report_html({"method": "task_arithmetic", "experts": ["A", "B"], "params": run.merge.manifest["params"],
                               "evaluation": run.evaluation})
    assert "<title>Merge report: task_arithmetic</title>" in page and "could not be drawn" not in page
    assert page.count("<img") == 2 and 'alt="per-task accuracy"' in page and 'alt="alpha curve"' in page
    assert '<td class="l">average</td>' in page  # the averages row under the table


def test_alpha_search_copies_each_candidate_into_the_shared_zero_shot_model_once(family, tmp_path, monkeypatch):
    """Zero-shot tasks share one model: an α candidate's weights are copied in once, not once per task
    (at T = 8 that was 8 copies of the whole state per candidate)."""
    from evaluation.models import TextModel
    from workers.pipeline import run_pipeline
    calls = []
    original = TextModel.set_state

    def set_state(self, state):
        calls.append(len(state))
        return original(self, state)
    monkeypatch.setattr(TextModel, "set_state", set_state)
    run = run_pipeline(_spec(family, "once", params={"alpha": "auto"}), cache_dir=str(tmp_path))
    n_candidates = len(run.evaluation["alpha_search"]["curve"])
    assert n_candidates == 30
    # one copy per candidate, one for the published model (2 tasks would make it 2 × 31)
    assert len(calls) == n_candidates + 1, len(calls)
