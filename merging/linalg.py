"""Shared linear algebra for the SVD merging methods.

No randomised approximations. Two precision regimes, chosen by the dtype of the input:

* float64 (``options.compute_dtype = "float64"``): LAPACK SVD everywhere; matches the official
  functions run in float64 to ~1e-12.
* float32 (the default): the methods need only the top-k singular triplets of each task
  matrix and polar factors of thin concatenations. Both are computed from a float64
  eigendecomposition of the *small* Gram matrix (n×n for an m×n matrix, m ≥ n). That is
  1.5–3× faster than a float32 LAPACK SVD of the matrix (most for wide matrices) and more
  accurate than it: the float64 Gram keeps the precision that squaring would cost in float32
  (a float32 Gram loses the noise-bulk singular vectors: 7e-2 error on the golden TSV-M case).

``eigh`` (LAPACK syevd) also does not suffer from gesdd's convergence failures on clustered
singular values (the FusionBench Iso-CTS crash), and ``svd`` falls back to it when gesdd fails.
"""
from __future__ import annotations

import torch


def svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``a = U diag(S) Vh`` with a fallback for inputs where gesdd fails to converge.

    Works on batches. The fallback computes the SVD in float64 via the eigendecomposition of
    the Gram matrix plus a QR-based recovery of the other factor, which never fails to converge.
    """
    try:
        if a.shape[-2] < a.shape[-1]:  # LAPACK is markedly slower on wide inputs: factor the transpose
            u, s, vh = torch.linalg.svd(a.mT, full_matrices=False)
            return vh.mT, s, u.mT
        return torch.linalg.svd(a, full_matrices=False)
    except RuntimeError:  # torch raises torch._C._LinAlgError (a RuntimeError) on non-convergence
        return _svd_via_eigh(a)


def _svd_via_eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dtype = a.dtype
    x = a.to(torch.float64)
    transpose = x.shape[-2] < x.shape[-1]
    if transpose:
        x = x.mT
    # x is tall (m >= n): eigenvectors of x^T x are the right singular vectors.
    evals, v = torch.linalg.eigh(x.mT @ x)
    evals, v = evals.flip(-1), v.flip(-1)
    s = evals.clamp_min(0).sqrt()
    xv = x @ v
    # Q from QR of x v gives orthonormal left vectors even for zero/clustered singular values.
    q, r = torch.linalg.qr(xv)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    u = q * signs.unsqueeze(-2)
    u, s, vh = u, s, v.mT
    if transpose:
        u, vh = vh.mT, u.mT
    return u.to(dtype), s.to(dtype), vh.to(dtype)


def polar(m: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor ``P Qh`` of ``m = P diag(s) Qh``: the nearest matrix with
    orthonormal columns (tall input) or rows (wide input).

    Computed as ``m (m^T m)^{-1/2}`` on the small side with ``eigh`` in float64, which is
    exact for full-rank inputs (the methods' precondition, see ALGORITHMS.md §0) and robust
    to clustered singular values. Rank-deficient inputs fall back to the SVD definition.
    """
    return polar_with_singular_values(m)[0]


def polar_with_singular_values(m: torch.Tensor, exact: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(polar(m), singular values of m)`` sharing one factorisation.

    ``exact`` (default: whether ``m`` is float64) selects the LAPACK SVD; otherwise the float64
    eigendecomposition of the small Gram matrix is used (see the module docstring).
    """
    if exact is None:
        exact = m.dtype == torch.float64
    if exact:
        u, s, vh = svd(m)
        return u @ vh, s
    dtype = m.dtype
    x = m.to(torch.float64)
    wide = x.shape[-2] < x.shape[-1]
    if wide:
        x = x.mT
    gram = x.mT @ x
    evals, w = torch.linalg.eigh(gram)
    sv2 = evals.clamp_min(0)
    smax = sv2.max().sqrt() if sv2.numel() else torch.tensor(0.0, dtype=x.dtype)
    # Condition guard: eigh of the Gram matrix squares the condition number. When the smallest
    # singular value is tiny relative to the largest, the inverse square root is inaccurate,
    # so use the SVD there (it is exact for any rank, with sign/rotation freedom only in the null space).
    if sv2.numel() == 0 or smax == 0 or sv2.min().sqrt() < 1e-6 * smax:
        u, s, vh = svd(x)
        p = u @ vh
        s_out = s
    else:
        p = x @ (w * sv2.rsqrt().unsqueeze(-2)) @ w.mT
        s_out = sv2.sqrt().flip(-1)
    if wide:
        p = p.mT
    return p.to(dtype), s_out.to(dtype)


def top_singular(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` singular triplets ``(U_k, S_k, Vh_k)`` of ``a`` (batched over leading dims).

    float64 input or k > r/2: truncated LAPACK SVD. Otherwise the eigendecomposition of the
    small Gram matrix, with the other factor recovered as ``a v / σ``.
    """
    m, n = a.shape[-2], a.shape[-1]
    r = min(m, n)
    if a.dtype == torch.float64 or 2 * k > r or k == 0:
        u, s, vh = svd(a)
        return u[..., :k], s[..., :k], vh[..., :k, :]
    wide = m < n
    x = (a.mT if wide else a).to(torch.float64)  # tall: (M, r)
    try:
        evals, w = torch.linalg.eigh(x.mT @ x)
    except RuntimeError:
        u, s, vh = svd(a)
        return u[..., :k], s[..., :k], vh[..., :k, :]
    evals = evals[..., -k:].flip(-1).clamp_min(0)
    v = w[..., -k:].flip(-1)  # (..., r, k) right singular vectors of x
    s = evals.sqrt()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    u = (x @ v) / safe.unsqueeze(-2)  # left singular vectors of x
    u = torch.where(s.unsqueeze(-2) > 0, u, torch.zeros_like(u))
    if wide:
        u, v = v, u
    return u.to(a.dtype), s.to(a.dtype), v.mT.to(a.dtype)
