"""Merge diagnostics (merging/diagnostics, workers/report/report_html.py) on small hand-made cases whose
answers are known in closed form."""
from __future__ import annotations

import json
import math
import threading

import pytest
import torch

from merging.diagnostics import DiagnosticsCollector, metrics as M
from merging.diagnostics.collector import select_layers, svd_sample_size
from merging.linalg import polar
from merging.linalg.spectral import polar_gram, singular_values
from merging.methods.base import TensorJob
from merging.methods.tsv_m import tsv_merge_matrix
from merging.roles import Role, RoleInfo, infer_role

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny matrices: OpenMP hand-offs would dominate (ms per product on a busy machine)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def orthonormal(m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(m, n, generator=g, dtype=F64))[0]


def orthogonal_tasks(sigmas: list[list[float]], m: int = 12, n: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task t = Q_t diag(σ_t) P_tᵀ with the Q_t (P_t) disjoint column blocks of one orthonormal Q (P)."""
    q, p = orthonormal(m, m, seed), orthonormal(n, n, seed + 1)
    taus, col = [], 0
    for s in sigmas:
        k = len(s)
        taus.append((q[:, col:col + k] * torch.tensor(s, dtype=F64)) @ p[:, col:col + k].mT)
        col += k
    return torch.stack(taus), q, p


# ------------------------------------------------------------------------------------------------
# geometry
# ------------------------------------------------------------------------------------------------

def test_identical_tasks_have_cosine_one_per_layer_and_over_the_model():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 5, generator=g), torch.randn(11, generator=g)
    layer1 = torch.stack([x, x, 3 * x, -x])
    layer2 = torch.stack([y, y, 3 * y, -y])
    c1 = M.cosine_similarity_matrix(layer1)
    assert torch.allclose(c1[:3, :3], torch.ones(3, 3, dtype=F64), atol=1e-6)
    assert torch.allclose(c1[3, :3], -torch.ones(3, dtype=F64), atol=1e-6)
    # Model level: Gram matrices of the layers add up to the Gram of the concatenated vectors.
    total = M.flat_gram(layer1) + M.flat_gram(layer2)
    whole = torch.cat([layer1.reshape(4, -1), layer2.reshape(4, -1)], 1).to(F64)
    assert torch.allclose(total, whole @ whole.mT, rtol=1e-6)
    assert torch.allclose(M.cosine_from_gram(total)[:3, :3], torch.ones(3, 3, dtype=F64), atol=1e-6)
    # The merged vector rides along as row/column T.
    gm = M.flat_gram(layer1, layer1[0])
    assert torch.allclose(M.cosine_from_gram(gm)[0, 4], torch.tensor(1.0, dtype=F64), atol=1e-6)
    assert torch.allclose(M.task_vector_norms(layer1), layer1.reshape(4, -1).norm(dim=1).to(F64), rtol=1e-6)


def test_zero_task_vector_gives_zero_cosine_not_nan():
    c = M.cosine_from_gram(M.flat_gram(torch.stack([torch.zeros(4), torch.ones(4)])))
    assert c.tolist() == [[0.0, 0.0], [0.0, 1.0]]


# ------------------------------------------------------------------------------------------------
# spectra, truncation
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_stable_and_effective_rank_of_flat_rank_r_matrix(exact, dtype):
    r = 5
    a = 2.5 * orthonormal(20, r, 1) @ orthonormal(12, r, 2).mT
    s = singular_values(a.to(dtype), exact=exact)
    assert M.stable_rank(s) == pytest.approx(r, rel=1e-5)
    assert M.effective_rank(s) == pytest.approx(r, rel=1e-3)  # float32 Gram: zero σ come out ~1e-4
    summ = M.spectrum_summary(s, n_top=3)
    assert summ["top"] == pytest.approx([2.5] * 3, rel=1e-5)
    assert summ["fraction_below_1pct"] == pytest.approx((12 - r) / 12)
    assert M.effective_rank(torch.zeros(4)) == 0.0 and M.stable_rank(torch.zeros(4)) == 0.0


def test_effective_rank_is_exp_entropy_of_normalised_singular_values():
    s = torch.tensor([3.0, 1.0])
    p = [0.75, 0.25]
    assert M.effective_rank(s) == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)))
    assert M.stable_rank(s) == pytest.approx(10 / 9)


def test_energy_kept_matches_hand_computation():
    taus, _, _ = orthogonal_tasks([[3.0, 2.0, 1.0]], m=6, n=5)
    s = singular_values(taus[0])
    assert s[:3].tolist() == pytest.approx([3, 2, 1], rel=1e-9)
    assert M.energy_kept(s, 2) == pytest.approx(13 / 14)
    assert M.energy_kept(s, 1) == pytest.approx(9 / 14)
    assert M.energy_kept(s, 0) == 0.0 and M.energy_kept(s, 99) == pytest.approx(1.0)
    assert math.isnan(M.energy_kept(torch.zeros(3), 1))


@pytest.mark.parametrize("transpose", [False, True])
def test_iso_energy_kept_matches_hand_computation(transpose):
    # Task 0: σ = (3, 2, 1); task 1: σ = (2.5, 0.5), orthogonal. The sum's top-2 (common space) holds
    # task 0's 3-direction and task 1's 2.5-direction; s = 1 residual direction each:
    # task 0 keeps (9 + 4)/14, task 1 keeps (6.25 + 0.25)/6.5 = 1.
    taus, _, _ = orthogonal_tasks([[3.0, 2.0, 1.0], [2.5, 0.5]], m=8, n=8)
    if transpose:  # wide layout: same answer through the other Gram formula
        taus = torch.cat([taus, torch.zeros(2, 8, 4, dtype=F64)], dim=2)
    u, _, _ = torch.linalg.svd(taus.sum(0))
    assert M.iso_energy_kept(taus, u[:, :2], 1) == pytest.approx([13 / 14, 1.0], abs=1e-9)
    assert M.iso_energy_kept(taus, u[:, :2], 0) == pytest.approx([9 / 14, 6.25 / 6.5], abs=1e-9)


def test_truncation_ranks_follow_the_methods():
    qkv, out = RoleInfo(Role.attn_qkv), RoleInfo(Role.attn_out)
    assert M.truncation_ranks("tsv_m", {}, (2304, 768), 8)["per_task"] == [96] * 8
    assert M.truncation_ranks("tsv_m", {}, (7, 16), 8)["per_task"] == [0] * 8
    cts = M.truncation_ranks("iso_cts", {"common_space_fraction": 0.8}, (768, 768), 8)
    assert cts["per_task"] == [19] * 8 and cts["common"] == 616
    assert M.truncation_ranks("iso_cts", {}, (96, 200), 8)["per_task"] == [2] * 8  # round(2.5) = 2
    assert M.truncation_ranks("esm", {}, (2304, 768), 8, qkv)["per_task"] == [288] * 8  # int(d_out/T)
    assert M.truncation_ranks("esm", {}, (768, 768), 8, out)["per_task"] == [96] * 8  # TSV-M on non-ESD keys
    assert M.truncation_ranks("iso_c", {}, (768, 3072), 8)["per_task"] == [768] * 8
    for method in ("task_arithmetic", "ties", "consensus", "dare", "breadcrumbs", "weight_average"):
        assert M.truncation_ranks(method, {}, (768, 768), 8) is None
    assert M.truncation_ranks("tsv_m", {}, (768,), 8) is None
    assert M.truncation_ranks("tsv_m", {}, (49408, 512), 8, RoleInfo(Role.embedding)) is None


# ------------------------------------------------------------------------------------------------
# SAR
# ------------------------------------------------------------------------------------------------

def test_sar_rank_reproduces_the_official_off_by_one():
    # Flat rank 4: sqrt(cumsum/total) = .5, .707, .866, 1 -> first index above .95 is 3, used as a count.
    assert M.sar_rank(torch.tensor([1.0, 1.0, 1.0, 1.0])) == 3
    assert M.sar_rank(torch.tensor([1.0, 0.0, 0.0])) == 0
    assert M.sar_rank(torch.zeros(3)) == 0  # NaN ratio: numpy argmax of all-false
    assert M.iso_sar_rank(768) == 693  # (i+1)/768 > 0.9025 first at i = 693
    assert M.iso_sar_rank(12) == 10


def test_sar_is_one_when_the_merged_matrix_keeps_the_task_span():
    taus, q, p = orthogonal_tasks([[1.0, 1.0], [1.0, 1.0]], m=12, n=12)
    # The span of the tasks plus a weaker extra direction: k_M = 4 keeps exactly the task span.
    merged = taus.sum(0) + 0.9 * torch.outer(q[:, 4], p[:, 4])
    res = M.sar(taus, merged)
    assert res["k_M"] == 4 and res["k_used"] == 4
    assert res["sar"] == pytest.approx([1.0, 1.0], abs=1e-9)
    assert res["k_iso"] == 10 and res["k_iso_used"] == 5  # U cut to the merged matrix's rank
    assert res["sar_iso"] == pytest.approx([1.0, 1.0], abs=1e-9)
    # merged = sum: the formula with the full span (k = rank) gives exactly 1 for every task.
    u = orthonormal(12, 12, 0)[:, :4]  # = span of the sum
    assert M.subspace_alignment_ratio(taus, u, 4).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)


def test_sar_uses_one_basis_for_every_task_not_the_fig3a_bug():
    # Square layer, merged = task 0 only: task 1 is orthogonal to it, so its SAR (and Iso SAR) is 0.
    # fig_3a.py's loop would give task 1 a full orthogonal basis from task 0's projection: SAR 1.
    taus, _, _ = orthogonal_tasks([[2.0, 1.0], [1.0, 0.5]], m=8, n=8)
    res = M.sar(taus, taus[0])
    assert res["sar"][1] == pytest.approx(0.0, abs=1e-9)
    assert res["sar_iso"][1] == pytest.approx(0.0, abs=1e-9)
    assert res["sar_iso"][0] == pytest.approx(1.0, abs=1e-9)


def test_sar_of_a_flat_iso_merge_orders_directions_by_the_task_sum():
    g = torch.Generator().manual_seed(4)
    taus = torch.randn(3, 16, 12, generator=g, dtype=F64)
    total = taus.sum(0)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    merged = s.mean() * (u @ vh)  # Iso-C: flat spectrum, so its own singular vectors are arbitrary
    res = M.sar(taus, merged, basis=total)
    k_iso = M.iso_sar_rank(12)
    assert res["k_M"] == k_iso == 10
    want = M.subspace_alignment_ratio(taus, u, k_iso).tolist()
    assert res["sar"] == pytest.approx(want, abs=1e-9) and res["sar_iso"] == pytest.approx(want, abs=1e-9)
    assert M.sar_basis("iso_c") == M.sar_basis("iso_cts") == "task_sum"
    assert M.sar_basis("esm", {}, RoleInfo(Role.mlp_up)) == "task_sum" and M.sar_basis("esm", {}, RoleInfo(Role.attn_out)) == "merged"
    assert M.sar_basis("task_arithmetic", {"subspace_boosting": {"beta": 0.01}}) == "task_sum"
    assert M.sar_basis("task_arithmetic", {"subspace_boosting": None}) == M.sar_basis("tsv_m") == "merged"


@pytest.mark.parametrize("shape", [(16, 10), (10, 16), (12, 12)])
def test_sar_fast_paths_match_the_definition(shape):
    g = torch.Generator().manual_seed(3)
    taus = torch.randn(3, *shape, generator=g, dtype=F64)
    merged = taus.sum(0) + 0.3 * torch.randn(*shape, generator=g, dtype=F64)
    u, s, _ = torch.linalg.svd(merged)
    k = M.sar_rank(s)
    want = M.subspace_alignment_ratio(taus, u, k).tolist()
    eigs = [M.small_side_eig(t) for t in taus]
    grams = torch.stack([e.gram for e in eigs]) if shape[0] < shape[1] else None
    got = M.sar(taus, merged, task_grams=grams)
    assert got["k_M"] == k
    assert got["sar"] == pytest.approx(want, abs=1e-9)


# ------------------------------------------------------------------------------------------------
# STI
# ------------------------------------------------------------------------------------------------

def test_sti_is_zero_for_orthogonal_tasks():
    taus, _, _ = orthogonal_tasks([[3.0, 1.0], [2.0, 1.0], [1.5, 0.5]], m=12, n=10)
    for orth in (False, True):
        res = M.sti_before_after(taus, 2, orthogonalised=orth)
        assert res["before"] == pytest.approx(0.0, abs=1e-10)
        assert res["after"] == pytest.approx(0.0, abs=1e-10)
    assert "uncertain" in res["label"]


def test_sti_matches_hand_computation():
    # Two rank-1 tasks in 2-D: UᵀU − I = [[0, cos a], [cos a, 0]], likewise for V, so the product is
    # diag(cos a·cos b·s2, cos a·cos b·s1): STI = |cos a cos b| (s1 + s2).
    a, b, s1, s2 = 0.3, 1.1, 2.0, 0.5
    u = torch.tensor([[1.0, math.cos(a)], [0.0, math.sin(a)]], dtype=F64)
    v = torch.tensor([[1.0, math.cos(b)], [0.0, math.sin(b)]], dtype=F64)
    s = torch.tensor([s1, s2], dtype=F64)
    assert M.singular_task_interference(u, s, v) == pytest.approx(abs(math.cos(a) * math.cos(b)) * (s1 + s2))


def test_sti_after_orthogonalisation_is_zero_and_sum_keeps_it():
    g = torch.Generator().manual_seed(5)
    taus = torch.randn(3, 20, 16, generator=g, dtype=F64)
    k = 3
    summed = M.sti_before_after(taus, k, orthogonalised=False)
    orth = M.sti_before_after(taus, k, orthogonalised=True)
    explicit = M.sti_before_after(taus, k, orthogonalised=True, explicit_polar=True)
    assert summed["before"] > 0.1 and summed["after"] == summed["before"] == orth["before"]
    assert orth["after"] < 1e-9 * orth["before"]
    assert explicit["after"] < 1e-9 * orth["before"]
    # polar_gram is the Gram matrix of linalg.polar's factor.
    u_cat, _, _ = M.task_factors(taus, k)
    p = polar(u_cat)
    assert torch.allclose(polar_gram(u_cat.mT @ u_cat), p.mT @ p, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# rank collapse
# ------------------------------------------------------------------------------------------------

def test_rank_collapse_indicator():
    # Identical rank-2 tasks: the sum has one task's effective rank (ratio 1).
    taus, _, _ = orthogonal_tasks([[1.0, 1.0]], m=10, n=10)
    same = taus.expand(3, -1, -1)
    res = M.rank_collapse(singular_values(same.sum(0), exact=True), [singular_values(t, exact=True) for t in same])
    assert res["erank_ratio"] == pytest.approx(1.0, rel=1e-6)
    assert res["merged_fraction_below_1pct"] == pytest.approx(0.8)
    # Three orthogonal rank-2 tasks with equal σ: the sum has three times the effective rank.
    taus, _, _ = orthogonal_tasks([[1.0, 1.0]] * 3, m=10, n=10)
    res = M.rank_collapse(singular_values(taus.sum(0), exact=True), [singular_values(t, exact=True) for t in taus])
    assert res["erank_ratio"] == pytest.approx(3.0, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# HO-GSVD
# ------------------------------------------------------------------------------------------------

def _gsvd_case():
    """Three 8×6 matrices D_i = U_i diag(σ_i) Vᵀ with one shared V: direction 0 common (equal σ),
    1, 2, 3 isolated in matrix 0, 1, 2, direction 4 mixed."""
    v = orthonormal(6, 6, 7)
    sig = torch.tensor([[1.0, 1.0, 0.0, 0.0, 2.0, 0.0],
                        [1.0, 0.0, 1.0, 0.0, 1.0, 0.0],
                        [1.0, 0.0, 0.0, 1.0, 0.5, 0.0]], dtype=F64)
    d = torch.stack([(orthonormal(8, 6, 10 + i) * sig[i]) @ v.mT for i in range(3)])
    return d, v, sig


def test_hogsvd_finds_common_and_isolated_subspaces():
    d, v, sig = _gsvd_case()  # column 5 of V is in no matrix: the stack is rank-deficient (rank 5 < 6)
    res = M.hogsvd(d, pi=1e-3)
    lam = res["eigenvalues"]
    assert res["reduced_dim"] == 5
    assert res["common"] == [0] and lam[0] == pytest.approx(1.0, abs=1e-9)
    assert float(lam[1]) > 1.5  # the mixed direction
    lam_iso = M.isolated_eigenvalue(3, 1e-3)
    assert lam[2:].tolist() == pytest.approx([lam_iso] * 3, rel=1e-9)
    assert res["isolated"] == [2, 3, 4] and sorted(res["isolated_owner"]) == [0, 1, 2]
    # The generalized right vectors are V's columns and σ_{i,k} the constructed values (up to order/sign).
    align = (res["V"].mT @ v).abs()
    for k, col in enumerate(align.argmax(1).tolist()):
        assert float(align[k, col]) == pytest.approx(1.0, abs=1e-8)
        assert res["sigma"][:, k].tolist() == pytest.approx(sig[:, col].tolist(), abs=1e-6)
    sim = res["similarity"]
    assert sim.shape == (3, 3) and torch.allclose(sim.diagonal(), torch.ones(3, dtype=F64))
    assert "reconstruction" in res["label"]


def test_hogsvd_similarity_of_identical_tasks_is_one():
    d, _, _ = _gsvd_case()
    res = M.hogsvd(torch.stack([d[0], d[0], d[1]]))
    assert float(res["similarity"][0, 1]) == pytest.approx(1.0, abs=1e-9)
    assert float(res["similarity"][0, 2]) < 0.99


def test_hogsvd_handles_rank_deficient_low_rank_tasks_via_grams():
    g = torch.Generator().manual_seed(2)
    d = torch.stack([torch.randn(4, 1, generator=g, dtype=F64) @ torch.randn(1, 10, generator=g, dtype=F64) for _ in range(3)])
    res = M.hogsvd(grams=d.mT @ d)
    assert res["reduced_dim"] == 3
    assert torch.isfinite(res["eigenvalues"]).all() and float(res["eigenvalues"].min()) >= 1 - 1e-9


# ------------------------------------------------------------------------------------------------
# collector
# ------------------------------------------------------------------------------------------------

SHAPES = {"attn.in_proj_weight": (24, 8), "attn.out_proj.weight": (8, 8), "mlp.c_fc.weight": (32, 8), "mlp.c_proj.weight": (8, 32)}


def small_plan(blocks: int = 4) -> list[tuple[str, tuple[int, ...]]]:
    plan = [("visual.positional_embedding", (10, 8)), ("visual.class_embedding", (8,))]
    for b in range(blocks):
        for name, shape in SHAPES.items():
            plan.append((f"visual.transformer.resblocks.{b}.{name}", shape))
        plan.append((f"visual.transformer.resblocks.{b}.ln_1.weight", (8,)))
    return plan


def make_jobs(n_tasks: int = 4, seed: int = 0) -> list[TensorJob]:
    g = torch.Generator().manual_seed(seed)
    jobs = []
    for i, (key, shape) in enumerate(small_plan()):
        taus = torch.randn(n_tasks, *shape, generator=g)
        jobs.append(TensorJob(key, infer_role(key, shape), taus, i))
    return jobs


def merged_of(job: TensorJob) -> torch.Tensor:
    return tsv_merge_matrix(job.taus) if job.is_matrix else job.taus.mean(0)


def run_collector(jobs, threads: int = 1, **kw) -> dict:
    names = [f"task{i}" for i in range(jobs[0].taus.shape[0])]
    plan_keys = [j.key for j in jobs if j.is_matrix]
    coll = DiagnosticsCollector("tsv_m", {"alpha": 1.0}, names, plan_keys=plan_keys, **kw)
    if threads == 1:
        for j in jobs:
            coll.observe(j, merged_of(j))
    else:
        barrier = threading.Barrier(threads)
        failures = []

        def work(part):
            try:
                barrier.wait()
                for j in part:
                    coll.observe(j, merged_of(j))
            except BaseException as e:  # pragma: no cover - reported below
                failures.append(e)

        ts = [threading.Thread(target=work, args=(jobs[i::threads],)) for i in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not failures
    return coll.finish()


def test_sampling_is_deterministic_stratified_and_evenly_spread():
    keys = [k for k, s in small_plan(12) if len(s) == 2]
    assert svd_sample_size(len(keys), 24, 0.15, 4) == 8
    assert svd_sample_size(14, 24, 0.15, 4) == 4 and svd_sample_size(400, 24, 0.15, 4) == 24 and svd_sample_size(3, 24, 0.15, 4) == 3
    a, b = select_layers(keys, 8), select_layers(list(keys), 8)
    assert a == b and len(a) == 8
    # Two of each role, at blocks 3 and 9 (centred even spread over 12 blocks).
    for name in SHAPES:
        assert [k for k in a if k.endswith(name)] == [f"visual.transformer.resblocks.{i}.{name}" for i in (3, 9)]
    assert select_layers(keys, 100) == keys and select_layers(keys, 0) == []


def test_collector_report_is_json_names_sampled_layers_and_is_thread_safe():
    jobs = make_jobs()
    seq = run_collector(jobs, hogsvd_layers=2)
    par = run_collector(jobs, threads=4, hogsvd_layers=2)
    text = json.dumps(seq, allow_nan=False)  # strictly JSON-serialisable
    assert json.loads(text)["format"] == "submerge.diagnostics/1"
    samp = seq["sampling"]
    assert samp["sampled"] is True and samp["matrix_keys"] == 17 and len(samp["svd_layers"]) == 4
    assert samp["analysed_svd_layers"] == samp["svd_layers"] and samp["not_observed"] == []
    assert [a["key"] for a in seq["svd_layers"]] == samp["svd_layers"]
    assert len(samp["hogsvd_layers"]) == 2 and seq["hogsvd"]["layers"] == samp["hogsvd_layers"]
    assert seq["errors"] == []
    assert len(seq["layers"]) == len(jobs)  # cheap statistics for every key, in plan order
    assert [r["key"] for r in seq["layers"]] == [j.key for j in jobs]
    # Four threads give the same report (apart from the timings).
    for rep in (seq, par):
        rep.pop("cost_s")
    assert par == seq
    layer = seq["svd_layers"][0]
    assert layer["sti"]["after"] == pytest.approx(0.0, abs=1e-3 * layer["sti"]["before"])  # TSV-M orthogonalises
    assert layer["truncation"]["per_task"] == [2, 2, 2, 2]
    assert set(seq["summary"]["overall"]) >= {"sar_mean", "sti_before", "erank_ratio", "mean_pairwise_cosine"}
    assert set(seq["per_task"]["sar"]) == {"task0", "task1", "task2", "task3"}


def test_collector_model_cosines_stream_over_layers_and_rescale():
    jobs = make_jobs()
    # Give task 1 the same task vector as task 0 everywhere: whole-model cosine 1.
    for j in jobs:
        j.taus[1] = j.taus[0]
    names = ["a", "b", "c", "d"]
    coll = DiagnosticsCollector("task_arithmetic", {}, names, plan_keys=[j.key for j in jobs if j.is_matrix], max_svd_layers=2)
    for j in jobs:
        coll.observe(j, j.taus.sum(0))
    key = jobs[0].key
    before = next(r["merged_norm"] for r in coll._build()["layers"] if r["key"] == key)
    coll.rescale({key: 2.0})
    rep = coll.finish()
    assert rep["model"]["cosine"][0][1] == pytest.approx(1.0, abs=1e-6)
    assert next(r["merged_norm"] for r in rep["layers"] if r["key"] == key) == pytest.approx(2 * before, rel=1e-5)
    lay = rep["svd_layers"][0]
    assert lay["truncation"] is None and lay["energy_kept"] is None
    assert lay["sti"]["after"] == lay["sti"]["before"]  # a sum keeps the task factors
    assert rep["hogsvd"] is not None


@pytest.mark.parametrize("method", ["iso_c", "iso_cts", "task_arithmetic", "esm"])
def test_collector_runs_for_other_method_families(method):
    jobs = make_jobs()
    coll = DiagnosticsCollector(method, {}, ["a", "b", "c", "d"], plan_keys=[j.key for j in jobs if j.is_matrix], max_svd_layers=4,
                                hogsvd_layers=1)
    for j in jobs:
        coll.observe(j, j.taus.sum(0))
    rep = coll.finish()
    assert rep["errors"] == [] and len(rep["svd_layers"]) == 4
    for lay in rep["svd_layers"]:
        assert all(0.0 <= v <= 1.0 for v in lay["sar"]["sar"])
        if method in ("iso_c", "iso_cts"):
            assert lay["sar"]["basis"] == "task_sum" and all(0.0 < v <= 1.0 for v in lay["energy_kept"])
    json.dumps(rep, allow_nan=False)


def test_collector_records_errors_instead_of_failing_the_merge():
    coll = DiagnosticsCollector("tsv_m", {}, ["a", "b"], plan_keys=["w"])
    job = TensorJob("w", RoleInfo(Role.matrix), torch.randn(2, 4, 3), 0)
    coll.observe(job, torch.zeros(3, 4))  # wrong orientation
    rep = coll.finish()
    assert rep["errors"] and rep["errors"][0]["key"] == "w"
    json.dumps(rep, allow_nan=False)


# ------------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------------

def _section(html: str, sid: str) -> str:
    start = html.index(f'<section id="{sid}">')
    return html[start:html.index("</section>", start)]


def test_render_report_html_with_and_without_evaluation():
    pytest.importorskip("matplotlib")
    from workers.report.report_html import render_report_html

    rep = run_collector(make_jobs(), hogsvd_layers=1)
    page = render_report_html(rep)
    assert page.startswith("<!DOCTYPE html>") and "</html>" in page
    for sid, n_img in (("similarity", 2), ("spectra", 1), ("sar-sti", 1), ("rank", 1)):
        assert _section(page, sid).count('<img alt="') == n_img
        assert '<img alt="' in page and 'src="data:image/png;base64,' in _section(page, sid)
    assert 'id="evaluation"' not in page

    rep["evaluation"] = {"tasks": {"task0": {"accuracy": 0.81, "finetuned": 0.9}, "task1": 0.7},
                         "alpha_curve": [{"alpha": 0.5, "score": 0.6}, {"alpha": 1.0, "score": 0.7}, {"alpha": 1.5, "score": 0.65}]}
    page = render_report_html(rep)
    ev = _section(page, "evaluation")
    assert ev.count('src="data:image/png;base64,') == 2 and "task0" in ev and "0.81" in ev
    assert "TALL-mask" not in ev
    rep["evaluation"]["lambda_search"] = {"grid": [0.2, 0.4], "chosen_lambda": {"a": 0.4},
                                          "validation_accuracy": {"a": [{"lambda": 0.2, "accuracy": 0.625},
                                                                        {"lambda": 0.4, "accuracy": 0.875}]}}
    ev = _section(render_report_html(rep), "evaluation")
    assert "TALL-mask λ per expert" in ev and "<td class=\"\">0.875</td>" in ev and "λ = 0.4" in ev

    # Sections without data are skipped; a bare report still renders.
    bare = render_report_html({"method": "task_arithmetic", "experts": ["a", "b"], "evaluation": {"alpha_curve": [{"alpha": 1, "score": 2}]}})
    assert 'id="spectra"' not in bare and 'id="similarity"' not in bare
    assert _section(bare, "evaluation").count("data:image/png;base64,") == 1
