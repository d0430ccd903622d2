"""merging.linalg.lapack (OpenBLAS syrk / syevr through ctypes) and the torch-only path of merging.linalg
that runs when the library is missing."""
from __future__ import annotations

import ctypes
import os
import threading
import time

import pytest
import torch

from merging.linalg import decompositions as linalg, lapack
from merging.methods.iso_cts import iso_cts_matrix
from merging.methods.tsv_m import tsv_merge_matrix

needs_lib = pytest.mark.skipif(not lapack.available(torch.zeros(1, dtype=torch.float64)),
                               reason="scipy-openblas32 is a project dependency; installed by make install")


def _without_library(monkeypatch):
    monkeypatch.setattr(lapack, "_lib", None)
    monkeypatch.setattr(lapack, "_loaded", True)


@pytest.fixture()
def torch_only(monkeypatch):
    _without_library(monkeypatch)


@needs_lib
@pytest.mark.parametrize("shape", [(300, 40), (40, 40), (7, 40)])
def test_syrk_gram_is_the_full_symmetric_gram(shape):
    x = torch.randn(*shape, dtype=torch.float64)
    g = linalg.gram(x)
    assert torch.equal(g, g.mT)
    assert torch.allclose(g, x.mT @ x, rtol=1e-12, atol=1e-12)
    assert torch.allclose(linalg.gram(x[:, ::2]), x[:, ::2].mT @ x[:, ::2], atol=1e-12)  # non-contiguous input
    y = x.mT.contiguous().mT  # a transposed view (the small side of a wide matrix): no copy, other BLAS flag
    assert not y.is_contiguous() or shape[0] == 1
    assert torch.allclose(linalg.gram(y), x.mT @ x, rtol=1e-12, atol=1e-12)


@needs_lib
@pytest.mark.parametrize("k", [1, 5, 39, 40])  # 40: all of them (the polar factors' eigensolver)
def test_syevr_top_k_matches_eigh(k, monkeypatch):
    monkeypatch.setattr(torch.linalg, "eigh", None)  # the library answers, not torch
    a = torch.randn(60, 40, dtype=torch.float64)
    g = a.mT @ a
    before = g.clone()
    evals, vecs = linalg.top_eigh(g, k)
    monkeypatch.undo()
    full_e, full_v = torch.linalg.eigh(g)
    assert torch.equal(g, before)  # the input is not overwritten
    assert torch.allclose(evals, full_e[-k:], rtol=1e-12)
    # same eigenvectors up to sign (the spectrum of a random Gram matrix is simple)
    assert torch.allclose((vecs.mT @ full_v[:, -k:]).abs(), torch.eye(k, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(g @ vecs, vecs * evals, atol=1e-9)


@needs_lib
@pytest.mark.parametrize("batch", [(), (3,)])
def test_syevd_is_torch_eigh(batch, monkeypatch):
    a = torch.randn(*batch, 50, 30, dtype=torch.float64)
    g = a.mT @ a
    before = g.clone()
    monkeypatch.setattr(torch.linalg, "eigh", None)  # the library answers, not torch
    evals, vecs = linalg.eigh(g)
    monkeypatch.undo()
    full_e, full_v = torch.linalg.eigh(g)
    assert torch.equal(g, before) and evals.shape == full_e.shape and vecs.shape == full_v.shape
    assert torch.allclose(evals, full_e, rtol=1e-12)
    eye = torch.eye(30, dtype=torch.float64).expand(*batch, 30, 30)
    assert torch.allclose((vecs.mT @ full_v).abs(), eye, atol=1e-9)  # same vectors up to sign


@needs_lib
@pytest.mark.parametrize("upper", [False, True])
def test_tridiagonal_reduction_gives_the_eigenpairs_with_q_applied_to_thin_matrices(upper):
    """A = Q T Qᵀ with T = Z Λ Zᵀ: Q (kept as reflectors) applied to Z gives A's eigenvectors, and
    Qᵀ undoes Q. The inputs are never written (ormtr works in place, on a copy)."""
    torch.manual_seed(4)
    a = torch.randn(50, 30, dtype=torch.float64)
    g = a.mT @ a
    tri_input = g.triu() if upper else g.tril()  # only the triangle asked for is read
    tri = lapack.Tridiagonal(tri_input, upper)
    evals, z = tri.eigh()
    full_e, full_v = torch.linalg.eigh(g)
    assert torch.allclose(evals, full_e, rtol=1e-12)
    m = torch.randn(30, 4, dtype=torch.float64)
    m_t = m.mT.contiguous().mT  # a transposed view, whose .mT is contiguous
    before, z_before = m.clone(), z.clone()
    w = tri.rotate_out(z)
    assert torch.allclose(g @ w, w * evals, atol=1e-9)
    assert torch.allclose(w.mT @ w, torch.eye(30, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(tri.rotate_in(tri.rotate_out(m_t)), m, atol=1e-12)
    assert torch.allclose(tri.rotate_in(m), z @ (w.mT @ m), atol=1e-12)  # Qᵀ = Z Wᵀ
    assert torch.equal(m_t, before) and torch.equal(z, z_before)
    assert torch.allclose(tri.rotate_out(z[:, :3]), w[:, :3], atol=1e-12)  # a column slice (a strided view)


@needs_lib
def test_syevd_can_overwrite_its_input():
    """The polar factor's 3072² Gram is not needed after its eigendecomposition: its memory takes
    the eigenvectors (one 75 MB array less at ESM's peak), with the same result as a copy."""
    a = torch.randn(50, 30, dtype=torch.float64)
    g = a.mT @ a
    evals, vecs = lapack.syevd(g)
    g2 = g.clone()
    evals2, vecs2 = lapack.syevd(g2, overwrite=True)
    assert torch.equal(evals, evals2) and torch.equal(vecs, vecs2)
    assert vecs2.data_ptr() == g2.data_ptr() and vecs.data_ptr() != g.data_ptr()


@needs_lib
def test_the_library_uses_the_calling_threads_torch_thread_count():
    """One thread inside the engine's worker pool; all of torch's when the main thread merges alone."""
    import ctypes
    import threading
    counts = {}
    g = torch.eye(8, dtype=torch.float64)

    def call(name, n):
        torch.set_num_threads(n)
        lapack.syevd(g)
        counts[name] = lapack._lib.scipy_openblas_get_num_threads()
    before = torch.get_num_threads()
    try:
        for name, n in [("pool", 1), ("main", 2), ("pool again", 1)]:
            t = threading.Thread(target=call, args=(name, n))
            t.start()
            t.join()
    finally:
        torch.set_num_threads(before)
        lapack._lib.scipy_openblas_set_num_threads(ctypes.c_int(1))
        lapack._threads = 1
    assert counts == {"pool": 1, "main": 2, "pool again": 1}


@needs_lib
def test_syevr_top_is_batched_like_eigh():
    a = torch.randn(3, 50, 20, dtype=torch.float64)
    evals, vecs = linalg.top_eigh(a.mT @ a, 4)
    assert evals.shape == (3, 4) and vecs.shape == (3, 20, 4)
    for i in range(3):
        e, _ = torch.linalg.eigh(a[i].mT @ a[i])
        assert torch.allclose(evals[i], e[-4:], rtol=1e-12)


def _python_progress_during(call) -> float:
    """How much a busy Python thread gets done while ``call()`` runs, relative to while the main
    thread sleeps for as long: about 1 on two cores when ``call`` releases the GIL, near 0 when it
    holds it (the other thread then waits for the whole C call; what it gets is the switches
    around the call)."""
    ticks, done = [], threading.Event()

    def busy_python():
        while not done.is_set():
            ticks.append(1)
    t = threading.Thread(target=busy_python)
    t.start()
    try:
        time.sleep(0.05)
        before = len(ticks)
        t0 = time.perf_counter()
        call()
        elapsed = time.perf_counter() - t0
        during = len(ticks) - before
        before = len(ticks)
        time.sleep(elapsed)
        idle = len(ticks) - before
    finally:
        done.set()
        t.join()
    return during / max(idle, 1)


@needs_lib
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores to run both threads at once")
def test_the_calls_release_the_gil(monkeypatch):
    """Merge workers are threads: while one is inside syevr or syrk, Python in another must run."""
    a = torch.randn(3000, 1200, dtype=torch.float64)
    g = a.mT @ a
    # One BLAS thread, as in a merge worker, leaves the other core to the Python thread; the best
    # of three tries rides out a moment of load from elsewhere (a held GIL scores near 0 every time).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        released = 0.0
        for _ in range(3):
            released = max(released, _python_progress_during(lambda: (linalg.top_eigh(g, 600), linalg.gram(a))))
            if released > 0.75:
                break
    finally:
        torch.set_num_threads(threads)
    # the same library through ctypes.PyDLL, which keeps the GIL during the call: the check must tell
    held_lib = ctypes.PyDLL(lapack._lib._name)
    for name in ("scipy_cblas_dsyrk", "scipy_LAPACKE_dsyevr"):
        f, ref = getattr(held_lib, name), getattr(lapack._lib, name)
        f.argtypes, f.restype = ref.argtypes, ref.restype
    monkeypatch.setattr(lapack, "_lib", held_lib)
    torch.set_num_threads(1)
    try:
        held = _python_progress_during(lambda: (linalg.top_eigh(g, 600), linalg.gram(a)))
    finally:
        torch.set_num_threads(threads)
    assert released > 2.5 * held, (released, held)  # one BLAS thread: 0.83–1.04 against 0.16–0.21 (two: 0.44–0.68)


@needs_lib
def test_methods_agree_with_and_without_the_library(monkeypatch):
    torch.manual_seed(0)
    taus = torch.randn(4, 96, 64) * 1e-3
    wide = torch.randn(4, 64, 96) * 1e-3  # Iso-CTS's other route (the torch-only path is CUDA's)
    with_lib = (tsv_merge_matrix(taus), iso_cts_matrix(taus, 0.8), iso_cts_matrix(wide, 0.8))
    _without_library(monkeypatch)
    assert not lapack.available(taus.double())
    without = (tsv_merge_matrix(taus), iso_cts_matrix(taus, 0.8), iso_cts_matrix(wide, 0.8))
    for x, y in zip(with_lib, without):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-9 * float(y.abs().max()))


def test_torch_only_path(torch_only):
    x = torch.randn(50, 20, dtype=torch.float64)
    assert torch.allclose(linalg.gram(x), x.mT @ x)
    evals, vecs = linalg.top_eigh(x.mT @ x, 3)
    assert torch.allclose(evals, torch.linalg.eigvalsh(x.mT @ x)[-3:])
    assert vecs.shape == (20, 3)


def test_syevr_failure_falls_back_to_the_svd(monkeypatch):
    """A LAPACK failure inside top_singular's eigensolver is not an error: the SVD is used."""
    def broken(a, k, upper=False):
        raise lapack.EigenError("LAPACK dsyevr failed (info=1, 0 of 3 eigenpairs)")
    monkeypatch.setattr(linalg, "top_eigh", broken)
    a = torch.randn(30, 12)
    u, s, vh = linalg.top_singular(a, 3)
    assert torch.allclose(s, torch.linalg.svdvals(a)[:3], rtol=1e-5)


def test_polar_survives_an_eigensolver_failure(monkeypatch):
    """The polar factors' eigensolver failing is not an error either: the SVD is used."""
    def broken(a, upper=False, overwrite=False):
        raise lapack.EigenError("LAPACK dsyevd failed (info=1)")
    a = torch.randn(30, 12)
    want = linalg.polar(a.double())
    monkeypatch.setattr(linalg, "eigh", broken)
    assert torch.allclose(linalg.polar(a).double(), want, atol=1e-5)
    assert torch.allclose(linalg.polar_times(a, torch.eye(12))[0].double(), want, atol=1e-5)


def test_submerge_no_openblas_turns_the_library_off():
    import subprocess
    import sys
    code = "import torch; from merging.linalg import lapack; print(lapack.available(torch.zeros(1, dtype=torch.float64)))"
    env = {**__import__("os").environ, "SUBMERGE_NO_OPENBLAS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("library", [True, False])
def test_top_eigh_reads_only_the_triangle_asked_for(library, monkeypatch):
    if not library:
        _without_library(monkeypatch)
    elif not lapack.available(torch.zeros(1, dtype=torch.float64)):
        pytest.skip("scipy-openblas32 not installed")
    a = torch.randn(40, 12, dtype=torch.float64)
    g = a.mT @ a
    ref, _ = torch.linalg.eigh(g)
    upper_only = g.triu() + torch.full_like(g, float("nan")).tril(-1)
    lower_only = g.tril() + torch.full_like(g, float("nan")).triu(1)
    assert torch.allclose(linalg.top_eigh(upper_only, 4, upper=True)[0], ref[-4:], rtol=1e-12)
    assert torch.allclose(linalg.top_eigh(lower_only, 4)[0], ref[-4:], rtol=1e-12)
    assert torch.allclose(linalg.eigh(upper_only, upper=True)[0], ref, rtol=1e-12)
    assert torch.allclose(linalg.eigh(lower_only)[0], ref, rtol=1e-12)
    # and the Gram triangle the polar factor and top_singular feed to the eigensolvers
    g_tri, upper = linalg._gram_triangle(a)
    assert upper == library
    assert torch.allclose(torch.linalg.eigvalsh(g_tri, UPLO="U" if upper else "L"), ref, rtol=1e-12)


def test_top_singular_batched_path_matches_the_per_matrix_one(monkeypatch):
    """CUDA keeps the batched Gram/eigh call; CI has no GPU, so the batched path is forced on CPU."""
    torch.manual_seed(1)
    a = torch.randn(3, 40, 24)
    per_matrix = linalg.top_singular(a, 5)
    monkeypatch.setattr(linalg, "_one_at_a_time", lambda a: False)
    batched = linalg.top_singular(a, 5)
    for x, y in zip(per_matrix, batched):
        assert x.shape == y.shape
    assert torch.allclose(per_matrix[1], batched[1], rtol=1e-5)
    # same singular subspaces (signs may differ)
    assert torch.allclose((per_matrix[0].mT @ batched[0]).abs().diagonal(dim1=-2, dim2=-1), torch.ones(3, 5), atol=1e-4)
    assert torch.allclose((per_matrix[2] @ batched[2].mT).abs().diagonal(dim1=-2, dim2=-1), torch.ones(3, 5), atol=1e-4)
