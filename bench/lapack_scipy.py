"""A patch for bench/compare_engines.py: merging.linalg.lapack's syrk, syevr and syevd through
SciPy's wrappers (scipy.linalg.blas.dsyrk, scipy.linalg.lapack.dsyevr/dsyevd) instead of ctypes.
SciPy has no dstedc or dormtr, so ESM's reduced-tridiagonal path keeps the ctypes calls. Needs
``pip install scipy`` in the venv; not used by the engine (bench/RESULTS.md says why)."""
import numpy as np
import torch
from scipy.linalg import blas
from scipy.linalg import lapack as sl

from merging.linalg import lapack as L


def syrk_upper(x):
    # x (m, n) row-major is xᵀ (n × m) in Fortran order: C = F Fᵀ = xᵀ x, upper triangle set
    c = blas.dsyrk(1.0, x.contiguous().numpy().T, trans=0, lower=0)
    return torch.from_numpy(np.ascontiguousarray(c))


def syevr_top(a, k, upper=False):
    n = a.shape[0]
    solve = n if 4 * k > n else k  # the same whole-spectrum rule as the ctypes binding
    w, z, _, _, info = sl.dsyevr(a.numpy(), compute_v=1, range="I", lower=0 if upper else 1, il=n - solve + 1, iu=n)
    if info != 0:
        raise L.EigenError(f"dsyevr info={info}")
    w, z = torch.from_numpy(w[:solve]), torch.from_numpy(z[:, :solve])
    return w[solve - k:].clone(), z[:, solve - k:]


def syevd(a, upper=False, overwrite=False):
    w, v, info = sl.dsyevd(a.numpy(), compute_v=1, lower=0 if upper else 1, overwrite_a=int(overwrite))
    if info != 0:
        raise L.EigenError(f"dsyevd info={info}")
    return torch.from_numpy(w), torch.from_numpy(v)


L.syrk_upper, L.syevr_top, L.syevd = syrk_upper, syevr_top, syevd
