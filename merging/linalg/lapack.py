"""BLAS/LAPACK routines from the OpenBLAS build that NumPy and SciPy ship (the
``scipy-openblas32`` wheel, symbols prefixed ``scipy_``), called through ctypes:

* ``syrk``: the upper triangle of ``xᵀx``, half the flops of a matmul (torch has no syrk);
* ``syevr`` (MRRR) with an index range: the top-k eigenpairs of a symmetric matrix without
  computing the other n − k eigenvectors (torch has no partial eigensolver);
* ``syevd``: every eigenpair, like ``torch.linalg.eigh``, which on this project's AMD EPYC VM is
  slower through torch's MKL (3072²: 8.6 against 6.9 s on one thread, 4.5 against 3.8 s on two);
* ``sytrd``, ``stedc`` and ``ormtr``: syevd's three steps apart (reduce to tridiagonal form
  Qᵀ A Q = T, eigenpairs of T, apply Q), so that a caller who needs only W·M or Wᵀ·M for a thin M
  can apply the reflectors to M instead of forming the n × n W = Q Z (the last step is 40 % of
  syevd at n = 3072, see ``merging.linalg.decompositions._polar_gram``).

ctypes releases the GIL for the call, so merge workers run them in parallel (SciPy's wrappers of
the same routines hold it). Each call uses as many threads as torch does in the calling thread:
one in the engine's worker pool (parallelism comes from merging one tensor per core), all cores
when the engine merges on the main thread alone (`options.workers: 1`). Everything here is optional:
``available()`` is False when the wheel is missing or its symbols differ, and
``merging.linalg.decompositions`` then uses torch alone.
"""
from __future__ import annotations

import ctypes
import os
import threading

import torch

_ROW_MAJOR, _COL_MAJOR = 101, 102
_UPPER, _NO_TRANS, _TRANS = 121, 111, 112

_lib = None
_loaded = False
_lock = threading.Lock()


def _load():
    global _lib, _loaded
    if _loaded:  # the hot path: every Gram and eigensolver call asks, from every merge worker
        return _lib
    with _lock:
        if not _loaded:
            _lib = _open()
            _loaded = True  # set after _lib, so the unlocked check above never sees a half-done load
        return _lib


def _open():
    """The library with its routines typed, or None (escape hatch set, wheel missing, symbols differ)."""
    if os.environ.get("SUBMERGE_NO_OPENBLAS"):  # escape hatch, and how the tests run the torch-only path
        return None
    try:
        # Imported here, on first use: the wheel is optional, and not loaded at all under the escape hatch.
        import scipy_openblas32 as pkg
        lib = ctypes.CDLL(os.path.join(pkg.get_lib_dir(), pkg.get_library(fullname=True)))
        syrk, syevr, syevd = lib.scipy_cblas_dsyrk, lib.scipy_LAPACKE_dsyevr, lib.scipy_LAPACKE_dsyevd
        sytrd, stedc, ormtr = lib.scipy_LAPACKE_dsytrd, lib.scipy_LAPACKE_dstedc, lib.scipy_LAPACKE_dormtr
        lib.scipy_openblas_set_num_threads(ctypes.c_int(1))
    except (ImportError, OSError, AttributeError, IndexError):
        return None
    dp, i32, c = ctypes.c_void_p, ctypes.c_int32, ctypes.c_char
    syrk.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i32, i32, ctypes.c_double, dp, i32,
                     ctypes.c_double, dp, i32]
    syrk.restype = None
    syevr.argtypes = [ctypes.c_int, c, c, c, i32, dp, i32, ctypes.c_double, ctypes.c_double, i32, i32,
                      ctypes.c_double, ctypes.POINTER(i32), dp, dp, i32, dp]
    syevr.restype = i32
    syevd.argtypes = [ctypes.c_int, c, c, i32, dp, i32, dp]
    syevd.restype = i32
    sytrd.argtypes = [ctypes.c_int, c, i32, dp, i32, dp, dp, dp]
    sytrd.restype = i32
    stedc.argtypes = [ctypes.c_int, c, i32, dp, dp, dp, i32]
    stedc.restype = i32
    ormtr.argtypes = [ctypes.c_int, c, c, c, i32, i32, dp, i32, dp, dp, i32]
    ormtr.restype = i32
    return lib


_threads = 1  # the library's thread count, as last set (it is process-wide)


def _match_threads() -> None:
    """Give the library the calling thread's torch thread count. OpenBLAS has one process-wide
    count; the engine never mixes counts at once (all its pool threads run with one, and its main
    thread computes only when there is no pool), so setting it before each call is enough."""
    global _threads
    n = torch.get_num_threads()
    if n != _threads:
        with _lock:
            _lib.scipy_openblas_set_num_threads(ctypes.c_int(n))
            _threads = n


def available(t: torch.Tensor) -> bool:
    """Whether the routines here apply to ``t``: a float64 CPU tensor, with the library present."""
    return t.device.type == "cpu" and t.dtype == torch.float64 and _load() is not None


def syrk_upper(x: torch.Tensor) -> torch.Tensor:
    """The upper triangle of ``xᵀx`` (n × n; zeros below the diagonal) of a 2-D float64 CPU ``x``
    (m × n). Eigensolvers read one triangle, so symmetrising (two more n × n arrays) is left to
    callers that need the full matrix."""
    m, n = x.shape
    c = torch.zeros((n, n), dtype=torch.float64)
    _match_threads()
    if x.mT.is_contiguous() and not x.is_contiguous():
        # a transposed view (a wide matrix's small side): C = y yᵀ of the row-major y = xᵀ (lda = m),
        # instead of a strided copy of x
        _lib.scipy_cblas_dsyrk(_ROW_MAJOR, _UPPER, _NO_TRANS, n, m, 1.0, x.mT.data_ptr(), m, 0.0, c.data_ptr(), n)
        return c
    x = x.contiguous()
    # Row-major A = x (lda = n), C = Aᵀ A: only the upper triangle of C is written.
    _lib.scipy_cblas_dsyrk(_ROW_MAJOR, _UPPER, _TRANS, n, m, 1.0, x.data_ptr(), n, 0.0, c.data_ptr(), n)
    return c


class EigenError(RuntimeError):
    """syevr or syevd reported an internal failure (info > 0)."""


def syevr_top(a: torch.Tensor, k: int, upper: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest eigenpairs of a symmetric float64 CPU ``a`` (n × n), ascending:
    ``(evals (k,), evecs (n, k))``. Reads the lower triangle of ``a`` (the upper one with
    ``upper``, like ``torch.linalg.eigh``'s UPLO) and does not modify ``a``.

    dsyevr runs MRRR (dstemr) only for the whole spectrum; an index subset goes through bisection
    and inverse iteration (dstebz + dstein), whose cost grows with k and with clusters: at n = 768
    on the synthetic benchmark's Gram matrices, the top 96 take 0.06 s, the top 616 0.37 s and all
    768 0.12 s (0.10 s for all against 0.12 s for the top 255). Above n/4 the whole spectrum is
    computed and its top k returned.
    """
    n = a.shape[0]
    solve = n if 4 * k > n else k
    work = a.contiguous().clone()  # destroyed by LAPACK
    w = torch.empty(n, dtype=torch.float64)
    z = torch.empty((solve, n), dtype=torch.float64)  # column-major n × solve: row i is eigenvector i
    isuppz = torch.empty(2 * max(1, solve), dtype=torch.int32)
    found = ctypes.c_int32(0)
    _match_threads()
    # LAPACK sees the C-contiguous matrix transposed (column-major): its upper triangle is our lower one.
    info = _lib.scipy_LAPACKE_dsyevr(_COL_MAJOR, b"V", b"I", b"L" if upper else b"U", n, work.data_ptr(), n, 0.0, 0.0,
                                     n - solve + 1, n, 0.0, ctypes.byref(found), w.data_ptr(), z.data_ptr(), n,
                                     isuppz.data_ptr())
    if info != 0 or found.value != solve:
        raise EigenError(f"LAPACK dsyevr failed (info={info}, {found.value} of {solve} eigenpairs)")
    if solve == k:
        return w[:k].clone(), z.mT
    return w[solve - k:solve].clone(), z[solve - k:].mT


def syevd(a: torch.Tensor, upper: bool = False, overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Every eigenpair of a symmetric float64 CPU ``a`` (n × n), ascending, as
    ``torch.linalg.eigh`` returns them: ``(evals (n,), evecs (n, n))`` with eigenvectors as
    columns. Reads the lower triangle (the upper one with ``upper``); ``a`` is not modified
    unless ``overwrite``, when a contiguous ``a`` receives the eigenvectors (one n × n array less)."""
    n = a.shape[0]
    work = a if overwrite and a.is_contiguous() else a.contiguous().clone()  # overwritten by the eigenvectors
    w = torch.empty(n, dtype=torch.float64)
    _match_threads()
    info = _lib.scipy_LAPACKE_dsyevd(_COL_MAJOR, b"V", b"L" if upper else b"U", n, work.data_ptr(), n, w.data_ptr())
    if info != 0:
        raise EigenError(f"LAPACK dsyevd failed (info={info})")
    return w, work.mT  # column-major columns are our rows


class Tridiagonal:
    """A symmetric matrix reduced to tridiagonal form, A = Q T Qᵀ (``sytrd``), with Q kept as
    its Householder reflectors: ``rotate_in(m)`` = Qᵀ m and ``rotate_out(m)`` = Q m for any
    n × p ``m``, each 2n²p flops, against 2n³ to form Q (or W = Q Z) explicitly."""

    def __init__(self, a: torch.Tensor, upper: bool = False, overwrite: bool = False):
        n = a.shape[0]
        # The reflectors stay in this array; LAPACK sees it column-major, so its triangles swap.
        self._refl = a if overwrite and a.is_contiguous() else a.contiguous().clone()
        self._uplo = b"L" if upper else b"U"
        self.diagonal = torch.empty(n, dtype=torch.float64)
        self.off_diagonal = torch.empty(max(n - 1, 1), dtype=torch.float64)
        self._tau = torch.empty(max(n - 1, 1), dtype=torch.float64)
        _match_threads()
        info = _lib.scipy_LAPACKE_dsytrd(_COL_MAJOR, self._uplo, n, self._refl.data_ptr(), n, self.diagonal.data_ptr(),
                                         self.off_diagonal.data_ptr(), self._tau.data_ptr())
        if info != 0:
            raise EigenError(f"LAPACK dsytrd failed (info={info})")

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every eigenpair of T (divide and conquer, ``stedc``), ascending: ``(evals (n,), Z (n, n))``
        with eigenvectors as columns. A's eigenvectors are Q Z."""
        n = self.diagonal.shape[0]
        evals, e = self.diagonal.clone(), self.off_diagonal.clone()
        z = torch.empty((n, n), dtype=torch.float64)
        _match_threads()
        info = _lib.scipy_LAPACKE_dstedc(_COL_MAJOR, b"I", n, evals.data_ptr(), e.data_ptr(), z.data_ptr(), n)
        if info != 0:
            raise EigenError(f"LAPACK dstedc failed (info={info})")
        return evals, z.mT  # column-major columns are our rows

    def rotate_in(self, m: torch.Tensor) -> torch.Tensor:
        return self._apply(m, transpose=True)

    def rotate_out(self, m: torch.Tensor) -> torch.Tensor:
        return self._apply(m, transpose=False)

    def _apply(self, m: torch.Tensor, transpose: bool) -> torch.Tensor:
        n, p = m.shape
        out = torch.empty((p, n), dtype=torch.float64)  # row-major (p, n) is column-major n × p;
        out.copy_(m.mT)  # always a copy: ormtr overwrites it, and m may be a view of the caller's array
        _match_threads()
        info = _lib.scipy_LAPACKE_dormtr(_COL_MAJOR, b"L", self._uplo, b"T" if transpose else b"N", n, p,
                                         self._refl.data_ptr(), n, self._tau.data_ptr(), out.data_ptr(), n)
        if info != 0:
            raise EigenError(f"LAPACK dormtr failed (info={info})")
        return out.mT
