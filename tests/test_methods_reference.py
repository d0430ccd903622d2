"""Methods against a float64 oracle (tests/reference.py) on cases the golden files do not hold:
T = 8 (TSV-M k = 0 and Iso-CTS s = 0 edge cases), T = 5, other shapes; plus robustness."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import merging
from merging.linalg.decompositions import _svd_via_eigh, polar, polar_times, polar_with_singular_values, svd, top_singular, top_singular_outside
from merging.methods.iso_cts import iso_cts_matrix
from tests import reference as ref
from tests.golden import rel_err

SHAPES = {"blk.a.weight": (80, 40), "blk.b.weight": (40, 80), "blk.sq.weight": (64, 64), "blk.tiny.weight": (7, 16),
          "blk.a.bias": (80,), "blk.scalar": (1,)}
F32_TOL = {"tsv_m": 6e-3, "iso_c": 4e-3, "iso_cts": 4e-3, "task_arithmetic": 4e-3, "ties": 1e-4, "consensus": 1e-4}


def _write(tvs, root):
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.zeros(s, dtype=torch.float32) for k, s in SHAPES.items()}, str(root / "base.safetensors"))
    paths = []
    for t, d in enumerate(tvs):
        p = root / f"e{t}.safetensors"
        save_file({k: v.float() for k, v in d.items()}, str(p))
        paths.append(str(p))
    return str(root / "base.safetensors"), paths


def _run(method, params, base, experts, out, compute):
    merging.merge({"method": method, "params": {"alpha": 1.0, **params}, "base": {"uri": base},
                   "experts": [{"uri": e} for e in experts], "output": {"uri": str(out), "dtype": "float64"},
                   "options": {"compute_dtype": compute}})
    return load_file(str(out / "model.safetensors"))


def _expected(method, params, tvs):
    mats = {k: [d[k] for d in tvs] for k in SHAPES}
    if method == "ties":
        return ref.ties(tvs, K=params["k"], merge_func=params["merge_func"])
    out = {}
    for k, shp in SHAPES.items():
        xs = mats[k]
        if method == "consensus":
            out[k] = ref.consensus(xs, [params["lambda"]] * len(xs), params["k"])
        elif method == "task_arithmetic":
            total = sum(xs)
            out[k] = ref.sb(total, params["subspace_boosting"]["beta"]) if len(shp) == 2 else total
        elif len(shp) != 2:
            out[k] = sum(xs) / len(xs)
        elif method == "tsv_m":
            out[k] = ref.tsvm(xs)
        elif method == "iso_c":
            out[k] = ref.iso_c(xs)
        elif method == "iso_cts":
            out[k] = ref.iso_cts(xs, params.get("common_space_fraction", 0.8))
    return out


CASES = [
    ("tsv_m", {}), ("iso_c", {}), ("iso_cts", {}), ("iso_cts", {"common_space_fraction": 0.5}),
    ("ties", {"k": 20, "merge_func": "mean"}), ("ties", {"k": 35, "merge_func": "sum"}),
    ("consensus", {"lambda": 0.5, "k": 3}), ("task_arithmetic", {"subspace_boosting": {"beta": 0.3}}),
]


@pytest.mark.parametrize("n_tasks", [5, 8])
@pytest.mark.parametrize("compute", ["float64", "float32"])
@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_against_reference(tmp_path, n_tasks, compute, method, params):
    tvs = ref.make_task_vectors(SHAPES, n_tasks, seed=100 + n_tasks)
    base, experts = _write(tvs, tmp_path / "in")
    out = _run(method, params, base, experts, tmp_path / "out", compute)
    expected = _expected(method, params, tvs)
    tol = 1e-9 if compute == "float64" else F32_TOL[method]
    for k in SHAPES:
        assert rel_err(out[k], expected[k]) <= tol, (method, k, rel_err(out[k], expected[k]))
    if method == "tsv_m" and n_tasks == 8:  # r = 7 < T: k = 0, the official all-zero matrix
        assert out["blk.tiny.weight"].abs().max() == 0


def test_iso_cts_clustered_singular_values(tmp_path):
    """8 experts with orthogonal supports inside one orthonormal basis: every concatenated factor
    matrix of Iso-CTS is exactly orthonormal, i.e. all its singular values cluster at 1, where
    gesdd-based orthogonalisation can fail to converge (FusionBench's Iso-CTS crash). The spectrum
    of the sum is distinct, so the answer is unique: ours must succeed and match the oracle."""
    torch.manual_seed(0)
    d, T = 96, 8
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    p, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    sigma = torch.linspace(1.0, 0.2, d, dtype=torch.float64) * 0.01
    root = tmp_path / "in"
    root.mkdir()
    save_file({"blk.w.weight": torch.zeros(d, d)}, str(root / "base.safetensors"))
    tvs, experts = [], []
    for t in range(T):
        idx = torch.arange(t, d, T)  # round-robin: every task holds large and small directions
        m = (q[:, idx] * sigma[idx]) @ p[:, idx].T
        tvs.append(m.float().double())
        save_file({"blk.w.weight": m.float()}, str(root / f"e{t}.safetensors"))
        experts.append(str(root / f"e{t}.safetensors"))
    expected = ref.iso_cts(tvs)
    for compute, tol in (("float64", 1e-8), ("float32", 4e-3)):
        out = _run("iso_cts", {}, str(root / "base.safetensors"), experts, tmp_path / f"out{compute}", compute)
        w = out["blk.w.weight"]
        assert torch.isfinite(w).all()
        assert rel_err(w, expected) < tol


def test_svd_fallback_matches_lapack():
    torch.manual_seed(1)
    for shape in [(30, 12), (12, 30), (4, 20, 9)]:
        a = torch.randn(*shape, dtype=torch.float64)
        u, s, vh = _svd_via_eigh(a)
        assert torch.allclose(u @ torch.diag_embed(s) @ vh, a, atol=1e-10)
        assert torch.allclose(s, torch.linalg.svdvals(a), atol=1e-10)
        assert torch.allclose(u.mT @ u, torch.eye(u.shape[-1], dtype=a.dtype).expand_as(u.mT @ u), atol=1e-10)


def test_svd_falls_back_when_lapack_fails(monkeypatch):
    a = torch.randn(20, 10, dtype=torch.float64)

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
    monkeypatch.setattr(torch.linalg, "svd", broken)
    u, s, vh = svd(a)
    assert torch.allclose((u * s) @ vh, a, atol=1e-10)


@pytest.mark.parametrize("shape,k", [((200, 60), 10), ((60, 200), 7), ((3, 90, 40), 5)])
def test_top_singular_float32_matches_float64_svd(shape, k):
    torch.manual_seed(2)
    a = torch.randn(*shape, dtype=torch.float64)
    a[..., :3, :] *= 30  # a spread spectrum
    u, s, vh = top_singular(a.float(), k)
    u64, s64, vh64 = torch.linalg.svd(a, full_matrices=False)
    assert torch.allclose(s.double(), s64[..., :k], rtol=1e-5)
    approx = (u.double() * s.double().unsqueeze(-2)) @ vh.double()
    exact = (u64[..., :k] * s64[..., :k].unsqueeze(-2)) @ vh64[..., :k, :]
    assert (approx - exact).abs().max() / exact.abs().max() < 1e-5


@pytest.mark.parametrize("m,n,p", [(120, 40, 25), (40, 120, 25), (60, 60, 50)])
def test_top_singular_outside_matches_the_explicit_residual(m, n, p):
    torch.manual_seed(4)
    x = torch.randn(m, n, dtype=torch.float64)
    x[:, :3] *= 20
    basis, _ = torch.linalg.qr(torch.randn(m, p, dtype=torch.float64))
    k = 6
    u, s, vh = top_singular_outside(x.float(), basis, k)
    u64, s64, vh64 = torch.linalg.svd(x - basis @ (basis.mT @ x), full_matrices=False)
    assert torch.allclose(s, s64[:k], rtol=1e-6)
    want = (u64[:, :k] * s64[:k]) @ vh64[:k]
    assert ((u * s) @ vh - want).abs().max() / want.abs().max() < 1e-6
    assert (basis.mT @ u).abs().max() < 1e-6  # the left vectors lie outside the basis
    assert torch.allclose(u.mT @ u, torch.eye(k, dtype=torch.float64), atol=1e-8)


@pytest.mark.parametrize("shape", [(8, 96, 48), (8, 48, 96), (8, 64, 64), (5, 120, 40), (3, 40, 40)])
def test_iso_cts_block_orthogonal_route_equals_the_direct_one(shape):
    """The float32 regime orthogonalises only the task block of [U_1 … U_T U_c] (the residuals lie
    outside the common space); the float64 regime forms and factors everything as the official
    code does. Both must give the oracle's matrix, on tall, wide and square layers."""
    from merging.methods.iso_cts import _iso_cts_direct, iso_cts_sizes
    torch.manual_seed(5)
    n_tasks, m, n = shape
    tvs = [torch.randn(m, 4, dtype=torch.float64) @ torch.randn(4, n, dtype=torch.float64)
           + 0.05 * torch.randn(m, n, dtype=torch.float64) for _ in range(n_tasks)]
    tvs = [t.float().double() for t in tvs]  # the inputs as float32 checkpoints hold them
    expected = ref.iso_cts(tvs)
    taus = torch.stack(tvs).float()
    k, s = iso_cts_sizes(min(m, n), n_tasks, 0.8)
    assert rel_err(iso_cts_matrix(taus, 0.8).double(), expected) < 2e-5
    assert rel_err(iso_cts_matrix(taus.double(), 0.8), expected) < 1e-10
    # the direct route in float32, for scale: the block-orthogonal one is no less accurate
    direct = rel_err(_iso_cts_direct(taus, taus.sum(0), k, s).double(), expected)
    assert rel_err(iso_cts_matrix(taus, 0.8).double(), expected) <= 2 * direct


def test_iso_cts_with_a_sum_of_rank_below_the_common_space():
    """A tall layer whose task sum has rank 6 < k: the common space is not an orthonormal basis
    from the Gram route (zero columns), so the direct route is taken; the result stays finite."""
    from merging.methods.iso_cts import _iso_cts_direct, iso_cts_sizes
    torch.manual_seed(6)
    shared = torch.randn(96, 6)
    taus = torch.stack([shared @ torch.randn(6, 48) for _ in range(4)])
    k, s = iso_cts_sizes(48, 4, 0.8)
    out = iso_cts_matrix(taus, 0.8)
    assert torch.isfinite(out).all()
    assert torch.equal(out, _iso_cts_direct(taus, taus.sum(0), k, s))


def test_polar_is_orthonormal_and_exact():
    torch.manual_seed(3)
    m = torch.randn(50, 20)
    p = polar(m)
    u, _, vh = torch.linalg.svd(m.double(), full_matrices=False)
    assert torch.allclose(p.double(), u @ vh, atol=1e-5)
    assert torch.allclose(p.mT @ p, torch.eye(20), atol=1e-5)


def _with_singular_values(m: int, n: int, sv: torch.Tensor) -> torch.Tensor:
    """A random float64 m × n matrix whose singular values are ``sv`` (min(m, n) of them)."""
    u = torch.linalg.qr(torch.randn(m, len(sv), dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, len(sv), dtype=torch.float64))[0]
    return (u * sv) @ v.mT


@pytest.mark.parametrize("cond,bound", [(10.0, 3e-6), (1e4, 3e-7)])
@pytest.mark.parametrize("shape", [(600, 150), (150, 600)])
def test_polar_of_float32_inputs_keeps_float64_accuracy_when_ill_conditioned(shape, cond, bound):
    """A float32 input's last product runs in float32 only when cond ≤ FLOAT32_PRODUCT_MAX_COND:
    there its error stays near the output's float32 level; at cond 1e4 a float32 product is off
    by 7e-5 here (measured), so the float64 product must be kept."""
    torch.manual_seed(11)
    m, n = shape
    x = _with_singular_values(m, n, torch.logspace(0, -math.log10(cond), min(m, n), dtype=torch.float64))
    x32 = x.float()
    want = polar(x32.double())  # float64 input: the float64 SVD route
    cases = [(polar_with_singular_values(x32)[0], want)]
    if m >= n:  # polar_times applies polar(x) to y without forming it (tall inputs)
        y = torch.randn(n, 7)
        cases.append((polar_times(x32, y)[0], want @ y.double()))
    for got, ref in cases:
        assert got.dtype == torch.float32
        assert (got.double() - ref).norm() / ref.norm() < bound


@pytest.mark.parametrize("shape", [(400, 120), (120, 400), (150, 150)])
def test_polar_with_a_few_tiny_singular_values_stays_exact_without_a_full_svd(shape, monkeypatch):
    """Three singular values at 1e-7..1e-8 of the largest (cond 1e8, like ESM's concatenated
    eigenbases, which reach 3.6e7): their Gram eigenvalues are below the Gram's rounding, so
    x w / σ is off by 6e-2 here. The Gram route handles those directions apart
    (``_polar_split``) and must match the float64 SVD without falling back to it."""
    from merging.linalg import decompositions as linalg

    def no_svd(*a):
        raise AssertionError("fell back to the full SVD")
    monkeypatch.setattr(linalg, "_polar_by_svd", no_svd)
    torch.manual_seed(5)
    m, n = shape
    r = min(m, n)
    sv = torch.cat([torch.logspace(0, -3, r - 3, dtype=torch.float64), torch.tensor([1e-7, 3e-8, 1e-8], dtype=torch.float64)])
    x = _with_singular_values(m, n, sv)
    uu, ss, vh = torch.linalg.svd(x, full_matrices=False)
    want = uu @ vh
    got, s = polar_with_singular_values(x, exact=False)
    assert (got - want).norm() / want.norm() < 2e-8
    assert ((s - ss).abs() / ss).max() < 2e-8  # the tiny ones too (from the block's own SVD)
    if m >= n:
        y = torch.randn(n, 7, dtype=torch.float64)
        got_y, _ = polar_times(x, y, exact=False)
        assert (got_y - want @ y).norm() / (want @ y).norm() < 2e-8


@pytest.mark.parametrize("tiny", [False, True])  # True: two directions go through _polar_split
def test_polar_times_a_thin_factor_applies_the_reflectors_without_forming_the_eigenvectors(tiny, monkeypatch):
    """polar(x) @ y with y narrower than half of x's small side (ESM's 3072² eigenbasis times its
    768-wide factor): the Gram's eigenvectors stay as reduction reflectors times the tridiagonal's
    eigenvectors (no syevd); a wide y still takes syevd. Both match the SVD."""
    from merging.linalg import decompositions as linalg, lapack
    if not lapack.available(torch.zeros(1, dtype=torch.float64)):
        pytest.skip("scipy-openblas32 is a project dependency; installed by make install")
    calls = []
    real_syevd, real_tri = lapack.syevd, lapack.Tridiagonal
    monkeypatch.setattr(lapack, "syevd", lambda *a, **k: calls.append("syevd") or real_syevd(*a, **k))
    monkeypatch.setattr(lapack, "Tridiagonal", lambda *a, **k: calls.append("sytrd") or real_tri(*a, **k))
    torch.manual_seed(6)
    n = 90
    sv = torch.logspace(0, -3, n, dtype=torch.float64)
    if tiny:
        sv[-2:] = torch.tensor([1e-7, 1e-8], dtype=torch.float64)
    x = _with_singular_values(n, n, sv)
    uu, _, vh = torch.linalg.svd(x)
    for width, route in ((20, "sytrd"), (60, "syevd")):
        y = torch.randn(n, width, dtype=torch.float64)
        calls.clear()
        got, s = polar_times(x, y, exact=False)
        assert calls == [route]
        assert (got - uu @ vh @ y).norm() / (uu @ vh @ y).norm() < 2e-8
        assert ((s - sv) / sv).abs().max() < 2e-8


def test_polar_of_a_batch_is_each_matrix_polar():
    """Batched inputs go one matrix at a time: each has its own small directions (the first
    matrix here has one, the second none) and its own float32-product decision."""
    torch.manual_seed(8)
    u = torch.linalg.qr(torch.randn(2, 60, 20, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(2, 20, 20, dtype=torch.float64))[0]
    sv = torch.stack([torch.cat([torch.ones(19, dtype=torch.float64), torch.tensor([1e-6], dtype=torch.float64)]),
                      torch.linspace(1, 0.5, 20, dtype=torch.float64)])
    x = ((u * sv.unsqueeze(-2)) @ v.mT).float()
    y = torch.randn(20, 5)
    p, s = polar_with_singular_values(x)
    p_y, _ = polar_times(x, y)
    for i in range(2):
        p_i, s_i = polar_with_singular_values(x[i])
        assert torch.allclose(p[i], p_i, atol=1e-6) and torch.allclose(s[i], s_i)
        assert torch.allclose(p_y[i], polar_times(x[i], y)[0], atol=1e-5)


@pytest.mark.parametrize("n_tokens", [500, 12, 5])  # full-rank calibration Gram (Cholesky root), singular (eigh root), fewer tokens than r (completed basis)
@pytest.mark.parametrize("d_out,d_in", [(48, 16), (16, 48)])
def test_esm_activation_eigenpairs_match_the_direct_covariance(n_tokens, d_out, d_in):
    from merging.methods.esm import activation_eigen
    torch.manual_seed(3)
    dw = torch.randn(d_out, d_in, dtype=torch.float64)
    x = torch.randn(n_tokens, d_in, dtype=torch.float64)
    gram = x.mT @ x
    r = d_out // 4
    vecs, evals, proj, norm = activation_eigen(dw, gram, n_tokens, r)
    assert torch.allclose(proj, vecs.mT @ dw, atol=1e-9 * float(dw.abs().max()))  # Eᵀ ΔW, completions included
    cov = (x @ dw.mT).mT @ (x @ dw.mT) / (n_tokens - 1)  # AᵀA/(N−1) from the activation shift itself
    ref_e, ref_v = torch.linalg.eigh(cov)
    ref_e, ref_v = ref_e.flip(0)[:r], ref_v.flip(1)[:, :r]
    rank = min(n_tokens, d_in, d_out)
    k = min(r, rank)
    assert torch.allclose(evals[:k], ref_e[:k], rtol=1e-9, atol=1e-9 * float(ref_e[0]))
    # same directions up to sign where the eigenvalues are nonzero
    assert torch.allclose((vecs[:, :k].mT @ ref_v[:, :k]).abs().diagonal(), torch.ones(k, dtype=torch.float64), atol=1e-6)
    if n_tokens >= d_out:
        assert norm == pytest.approx(float(dw.norm()), rel=1e-12)
