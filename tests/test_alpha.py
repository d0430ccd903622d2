"""α selection: the search rules of ALGORITHMS.md §0 (pure), the engine's choose_alpha hook (the
model written with the chosen α equals a plain merge with that α), and the spec rules for
params.alpha = "auto"."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import merging
from merging.alpha import ESM_GOLDEN, ISO_GRID, SUM_GRID, SVD_GRID, AlphaScore, search_alpha
from merging.errors import SpecError
from merging.methods import get_method
from merging.spec import load_spec


def _scores(f_acc, f_norm=None):
    calls = []

    def evaluate(a):
        calls.append(a)
        acc = f_acc(a)
        return AlphaScore(a, acc, f_norm(a) if f_norm else acc)
    return evaluate, calls


def test_grids_are_the_official_ones():
    assert len(SUM_GRID.grid) == 30 and SUM_GRID.grid[0] == pytest.approx(1 / 30) and SUM_GRID.grid[-1] == 1.0
    assert len(SVD_GRID.grid) == 30 and SVD_GRID.grid[0] == pytest.approx(0.1) and SVD_GRID.grid[-1] == pytest.approx(3.0)
    assert ISO_GRID.early_stop == 3 and SVD_GRID.early_stop is None
    assert (ESM_GOLDEN.interval, ESM_GOLDEN.tol, ESM_GOLDEN.max_iter) == ((0.0, 2.0), 0.01, 15)
    assert get_method("task_arithmetic").alpha_search is SUM_GRID and get_method("ties").alpha_search is SUM_GRID
    assert get_method("consensus").alpha_search is SUM_GRID and get_method("tsv_m").alpha_search is SVD_GRID
    assert get_method("iso_c").alpha_search is ISO_GRID and get_method("iso_cts").alpha_search is ISO_GRID
    assert get_method("esm").alpha_search is ESM_GOLDEN and get_method("weight_average").alpha_search is None


def test_grid_picks_the_best_normalized_point_and_evaluates_every_point():
    evaluate, calls = _scores(lambda a: -(a - 0.4) ** 2, lambda a: -(a - 0.5) ** 2)
    chosen, curve = search_alpha(SUM_GRID, evaluate)
    assert len(calls) == 30 and [s.alpha for s in curve] == pytest.approx(list(SUM_GRID.grid))
    assert chosen.alpha == pytest.approx(0.5)  # chosen by normalized accuracy, not by accuracy (0.4)


def test_iso_grid_stops_after_three_steps_without_improvement():
    evaluate, calls = _scores(lambda a: -(a - 0.7) ** 2)
    chosen, curve = search_alpha(ISO_GRID, evaluate)
    assert calls == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    assert chosen.alpha == pytest.approx(0.7)
    # ties do not count as improvement either
    evaluate, calls = _scores(lambda a: 0.5)
    chosen, _ = search_alpha(ISO_GRID, evaluate)
    assert len(calls) == 4 and chosen.alpha == pytest.approx(0.1)


def test_golden_section_finds_the_maximum_within_tolerance():
    evaluate, calls = _scores(lambda a: -(a - 1.3) ** 2)
    chosen, curve = search_alpha(ESM_GOLDEN, evaluate)
    assert abs(chosen.alpha - 1.3) < 0.02
    assert len(calls) <= ESM_GOLDEN.max_iter + 2 and len(set(calls)) == len(calls)  # no point evaluated twice
    assert all(0.0 <= a <= 2.0 for a in calls)
    # reported α: the best *normalized* point among those evaluated
    evaluate, _ = _scores(lambda a: -(a - 1.3) ** 2, lambda a: -abs(a - 0.9))
    chosen, curve = search_alpha(ESM_GOLDEN, evaluate)
    assert chosen.avg_normalized == max(s.avg_normalized for s in curve)


# -- the engine hook ---------------------------------------------------------------------------------

@pytest.fixture()
def ckpts(tmp_path):
    torch.manual_seed(0)
    shapes = {**{f"blocks.{i}.mlp.c_fc.weight": (12, 6) for i in range(3)}, "blocks.0.ln_1.weight": (6,),
              "head.weight": (4, 6)}
    base = {k: torch.randn(s) for k, s in shapes.items()}
    base["position_ids"] = torch.arange(5)
    save_file(base, str(tmp_path / "base.safetensors"))
    for t in range(3):
        e = {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v for k, v in base.items()}
        save_file(e, str(tmp_path / f"e{t}.safetensors"))
        save_file({k: torch.randn(40, 6) for k, s in shapes.items() if len(s) == 2 and "head" not in k}, str(tmp_path / f"c{t}.safetensors"))
    return tmp_path


def _spec(root, method, params, out, calib=False):
    return {"method": method, "params": params, "base": {"uri": str(root / "base.safetensors")},
            "experts": [{"uri": str(root / f"e{t}.safetensors"), "name": f"t{t}",
                         **({"calibration": {"uri": str(root / f"c{t}.safetensors")}} if calib else {})} for t in range(3)],
            "output": {"uri": str(root / out)}, "passthrough": ["head.*"],
            "options": {"compute_dtype": "float64", "diagnostics": "off"}}


@pytest.mark.parametrize("method,calib", [("task_arithmetic", False), ("tsv_m", False), ("esm", True)])
def test_choose_alpha_writes_the_same_model_as_a_plain_merge(ckpts, method, calib):
    seen = {}

    def choose(tv):
        seen["keys"] = sorted(tv.keys())
        seen["scaled"] = {k: tv.alpha_scaled(k) for k in tv.keys()}
        seen["state"] = tv.state(0.7)
        return 0.7

    spec = _spec(ckpts, method, {}, "auto", calib)
    # the library path: auto is refused without a search, accepted with one
    auto = load_spec({**spec, "params": {"alpha": "auto"}, "evaluation": {"tasks": [
        {"expert": "t0", "test": {"uri": "x.jsonl"}, "validation": {"uri": "v.jsonl"}, "labels": ["a", "b"]}]}})
    with pytest.raises(SpecError, match="params.alpha"):
        merging.merge(auto)
    res = merging.merge(auto, choose_alpha=choose)
    plain = merging.merge(_spec(ckpts, method, {"alpha": 0.7}, "plain", calib))
    got, want = load_file(str(ckpts / "auto" / "model.safetensors")), load_file(str(ckpts / "plain" / "model.safetensors"))
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    assert res.manifest["params"]["alpha"] == 0.7 and res.manifest["timings_s"]["alpha_search"] >= 0
    assert [r["coefficient"] for r in res.manifest["tensors"] if "coefficient" in r] == \
        [r["coefficient"] for r in plain.manifest["tensors"] if "coefficient" in r]
    assert "head.weight" not in seen["keys"] and "position_ids" not in seen["keys"]  # copied keys are not α's business
    for k, v in seen["state"].items():  # TaskVector.state(α) is exactly what gets written
        torch.testing.assert_close(v.to(want[k].dtype), want[k], rtol=1e-12, atol=1e-12)
    if method == "esm":  # α scales only the ESD keys (§4.6)
        assert seen["scaled"]["blocks.0.ln_1.weight"] is False and seen["scaled"]["blocks.0.mlp.c_fc.weight"] is True
    else:
        assert all(seen["scaled"].values())
    assert not list(ckpts.glob("auto*/.spill"))


def test_choose_alpha_non_finite_is_refused_and_nothing_is_published(ckpts):
    spec = _spec(ckpts, "task_arithmetic", {}, "bad")
    with pytest.raises(merging.MergeError, match="α search returned nan"):
        merging.merge(spec, choose_alpha=lambda tv: math.nan)
    assert not (ckpts / "bad").exists()


# -- the spec -------------------------------------------------------------------------------------------

def _base_spec(**over):
    spec = {"method": "tsv_m", "base": {"uri": "b"}, "experts": [{"uri": "e0", "name": "a"}, {"uri": "e1", "name": "b"}],
            "output": {"uri": "o"}}
    spec.update(over)
    return spec


TASK = {"expert": "a", "test": {"uri": "t.jsonl"}, "labels": ["x", "y"]}


@pytest.mark.parametrize("over,message", [
    ({"params": {"alpha": "auto"}}, "params.alpha: 'auto' chooses α on validation data, but the spec has no evaluation section"),
    ({"params": {"alpha": "auto"}, "evaluation": {"tasks": [TASK]}}, "but evaluation.tasks.0.validation is missing"),
    ({"method": "weight_average", "params": {"alpha": "auto"}}, "not available for method 'weight_average'"),
    ({"params": {"alpha": "high"}}, "params.alpha"),
    ({"evaluation": {"tasks": [{**TASK, "expert": "zz"}]}}, "evaluation.tasks.0.expert: no expert named 'zz'"),
    ({"evaluation": {"tasks": [{**TASK, "labels": None}]}}, "evaluation.tasks.0.labels: text_zero_shot needs the class names"),
    ({"evaluation": {"tasks": [{**TASK, "prompt": "a {c}"}]}}, "prompt must contain '{label}'"),
    ({"evaluation": {"tasks": [TASK, TASK]}}, "duplicate task name(s) ['a']"),
    ({"evaluation": {"tasks": [], }}, "evaluation.tasks"),
    ({"experts": [{"uri": "e0", "calibration": {}}, {"uri": "e1"}]}, "give either 'uri' (precomputed statistics) or 'data'"),
    ({"experts": [{"uri": "e0", "calibration": {"uri": "c", "data": {"uri": "d"}}}, {"uri": "e1"}]}, "not both"),
])
def test_spec_errors_name_the_field(over, message):
    with pytest.raises(SpecError) as e:
        load_spec(_base_spec(**over))
    assert message in str(e.value)


def test_auto_with_validation_and_classification_heads_are_accepted():
    spec = load_spec(_base_spec(params={"alpha": "auto"}, passthrough=["lm.*"], evaluation={
        "evaluator": "sequence_classification", "heads": ["classifier.*", "lm.*"],
        "tasks": [{"expert": "a", "test": {"uri": "t"}, "validation": {"uri": "v"}},
                  {"expert": "b", "test": {"uri": "t2"}, "validation": {"uri": "v2"}}]}))
    assert spec.alpha_auto and spec.method_params().alpha == 1.0  # the search replaces the default
    assert spec.effective_passthrough() == ["lm.*", "classifier.*"]
    assert load_spec(spec.model_dump(mode="json")).effective_passthrough() == ["lm.*", "classifier.*"]  # round trip
