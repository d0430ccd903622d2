"""Spectra for analysis (the diagnostics), where the methods' routines would cost too much.

``small_side_eig`` is a cheaper route to a matrix's spectrum than ``decompositions.top_singular``
(which forms the Gram in float64 for the methods' 1e-12 accuracy): one GEMM for the Gram matrix
of the small side and one ``eigh``, both in the input's precision (at least float32). On one CPU
core that is 2-4x cheaper than LAPACK's SVD and than ``top_singular``, and it gives the whole
spectrum plus the singular vectors of the small side at once. Cost matters because the diagnostics
repeat this for T task matrices per analysed layer. Price of the float32 Gram: singular values
below about 5e-4·σ1 carry an absolute error of that order. That does not move any summary the
diagnostics report (energy fractions, σ-entropy, top values, the 1 % threshold) by more than
~1e-6; ``small_side_eig`` reports values below 1e-3·σ1 as 0 (float64: 1e-7·σ1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from merging.linalg.decompositions import divide_columns, svd


def spectral_dtype(t: torch.Tensor) -> torch.dtype:
    """The precision spectra are computed in: the tensor's own when float32 or float64, else float32."""
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


@dataclass
class SmallSideEig:
    """Spectrum of an (m, n) matrix from the eigendecomposition of its small-side Gram matrix.

    ``side == "right"`` (m ≥ n): ``gram = aᵀa`` (n×n) and ``vecs`` are right singular vectors.
    ``side == "left"`` (m < n): ``gram = a aᵀ`` (m×m) and ``vecs`` are left singular vectors.
    ``s``: all r = min(m, n) singular values, descending; ``vecs[:, i]`` belongs to ``s[i]``.
    """
    side: str
    gram: torch.Tensor
    s: torch.Tensor
    vecs: torch.Tensor | None


# Below this fraction of σ_1 a singular value from a Gram eigendecomposition is indistinguishable
# from 0 (measured float32 noise: ≤ 5e-4·σ_1 for 768-wide matrices); such values are set to 0.
_SIGMA_FLOOR = {torch.float32: 1e-3, torch.float64: 1e-7}


def small_side_eig(a: torch.Tensor, vectors: bool = True) -> SmallSideEig:
    """σ (and small-side singular vectors) of ``a`` via ``eigh`` of its small-side Gram matrix.

    ``σ_i = sqrt(λ_i(aᵀa))`` (or of ``a aᵀ``); see the module docstring for cost and accuracy.
    Values below 1e-3·σ_1 (float32; 1e-7·σ_1 in float64) are returned as 0: the Gram route cannot
    resolve them, and left as noise they would inflate the effective rank of low-rank matrices.
    """
    x = a.to(spectral_dtype(a))
    m, n = x.shape
    right = m >= n
    gram = x.mT @ x if right else x @ x.mT
    gram = (gram + gram.mT) / 2
    if vectors:
        evals, vecs = torch.linalg.eigh(gram)
        vecs = vecs.flip(-1)
    else:
        evals, vecs = torch.linalg.eigvalsh(gram), None
    s = evals.flip(-1).clamp_min(0).sqrt()
    if s.numel():
        s = torch.where(s > _SIGMA_FLOOR[x.dtype] * s[0], s, torch.zeros_like(s))
    return SmallSideEig("right" if right else "left", gram, s, vecs)


def singular_values(a: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """All r singular values of ``a``, descending, float64 on the CPU.

    ``exact=True`` uses ``decompositions.svd`` (LAPACK); otherwise ``small_side_eig``.
    """
    if exact:
        return svd(a.to(torch.float64))[1].cpu()
    return small_side_eig(a, vectors=False).s.to(torch.float64).cpu()


def top_factors(a: torch.Tensor, eig: SmallSideEig, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k singular triplets of ``a`` from its ``small_side_eig``: ``(U_k (m×k), S_k (k,), V_k (n×k))``.

    The other side's vectors are ``a v_i / σ_i`` (or ``aᵀ u_i / σ_i``); a zero σ gives a zero
    vector, which contributes nothing to any σ-weighted quantity.
    """
    if eig.vecs is None:
        raise ValueError("top_factors needs small_side_eig(..., vectors=True)")
    x = a.to(eig.gram.dtype)
    s = eig.s[:k]
    w = eig.vecs[:, :k]
    other = divide_columns((x @ w) if eig.side == "right" else (x.mT @ w), s)
    return (other, s, w) if eig.side == "right" else (w, s, other)


def polar_gram(g: torch.Tensor) -> torch.Tensor:
    """``PᵀP`` for ``P = merging.linalg.polar(X)``, from ``g = XᵀX`` alone (K×K; X tall, m ≥ K).

    For full-rank X, ``polar(X) = X (XᵀX)^{-1/2}``, so ``PᵀP = G^{-1/2} G G^{-1/2}`` (= I up to
    rounding). When X is numerically rank-deficient (σ_min < 1e-6·σ_max, the guard
    ``linalg.polar`` uses; 1e-3 for a float32 Gram, which cannot resolve smaller σ), ``linalg.polar``
    returns ``U Vh`` of a thin SVD, whose columns are orthonormal, so ``PᵀP = I`` exactly. Costs one K×K ``eigh`` instead of forming P (m×K).
    Computed in ``g``'s precision: in float32 the result is I to ~1e-5 (float64: ~1e-14).
    """
    dtype = g.dtype
    g = (g + g.mT) / 2
    evals, w = torch.linalg.eigh(g)
    ev = evals.clamp_min(0)
    smax = ev.max().sqrt() if ev.numel() else torch.tensor(0.0)
    guard = 1e-6 if dtype == torch.float64 else 1e-3  # a float32 Gram resolves σ down to ~5e-4·σ_max only
    if ev.numel() == 0 or smax == 0 or ev.min().sqrt() < guard * smax:
        return torch.eye(g.shape[-1], dtype=dtype, device=g.device)
    half = w * ev.rsqrt().unsqueeze(-2)  # G^{-1/2} = W Λ^{-1/2} Wᵀ
    inv_sqrt = half @ w.mT
    return (inv_sqrt @ g @ inv_sqrt).to(dtype)
