"""Data-free merge diagnostics: the formulas, as pure functions on tensors.

Conventions (ALGORITHMS.md §0): a task vector of one key is ``τ_t = θ_t − θ0``; ``taus`` is the
stack (T, *shape); matrices are oriented (out, in) = (m, n), r = min(m, n); singular values are
descending. Nothing here reads files or keeps state; ``collector.DiagnosticsCollector`` composes
these functions while a merge streams.

Which linear algebra is used where:

* ``merging.linalg.polar`` (STI after orthogonalisation) and ``merging.linalg.svd``
  (``singular_values(..., exact=True)``) are the shared routines the methods use.
* ``merging.linalg.spectral`` (``small_side_eig``, ``top_factors``, ``polar_gram``) is the
  diagnostics' own, cheaper route to a matrix's spectrum (its docstring says what that costs in
  accuracy and why it is enough here).

What a method did to a layer (the rank it kept, the basis that orders its merged matrix's
directions, whether it orthogonalised) comes from the method's own hooks
(``merging.methods.base.MergeMethod.truncation``, ``.sar_basis``, ``.orthogonalises``): nothing
here names a method.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from merging.linalg import polar
from merging.linalg.spectral import SmallSideEig, polar_gram, small_side_eig, top_factors
from merging.methods import get_method
from merging.methods.base import MergeMethod, MethodParams, SarBasis, Truncation
from merging.roles import NON_MATRIX_2D_ROLES, Role, RoleInfo

SAR_THRESHOLD = 0.95  # fig_3a.py


# =============================================================================================
# Task-vector geometry (cheap; every key)
# =============================================================================================

def flat_gram(taus: torch.Tensor, merged: torch.Tensor | None = None) -> torch.Tensor:
    """Gram matrix of the flattened task vectors, float64 on the CPU.

    ``G[s, t] = <vec τ_s, vec τ_t>`` (T×T). With ``merged``, one more row/column holds the
    merged task vector: ``G[t, T] = <vec τ_t, vec τ_M>``, ``G[T, T] = ‖τ_M‖²``.
    Gram matrices of different keys *add up* to the Gram matrix of the whole-model
    (concatenated) task vectors, which is how the model-level cosines stream.
    The products run in the input's precision (float32 or float64) and are accumulated in float64.
    """
    n_tasks = taus.shape[0]
    x = taus.reshape(n_tasks, -1)
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    mv = merged.reshape(1, -1).to(x.dtype) if merged is not None else None
    size = n_tasks + (1 if mv is not None else 0)
    out = torch.zeros((size, size), dtype=torch.float64, device=x.device)
    # Column chunks (CPU): a (T × D)(D × T) product with huge D runs at half speed as one GEMM, and
    # float64 accumulation of the chunk products keeps the sums exact to ~1e-7 relative.
    chunk = _GRAM_CHUNK if x.device.type == "cpu" else max(x.shape[1], 1)  # one product on accelerators
    for start in range(0, x.shape[1], chunk):
        y = x[:, start:start + chunk]
        out[:n_tasks, :n_tasks] += (y @ y.mT).to(torch.float64)
        if mv is not None:
            z = mv[:, start:start + chunk]
            out[:, n_tasks] += torch.cat([(y @ z.mT).squeeze(1), (z @ z.mT).reshape(1)]).to(torch.float64)
    if mv is not None:
        out[n_tasks, :n_tasks] = out[:n_tasks, n_tasks]
    return out.cpu()


_GRAM_CHUNK = 1 << 16


def task_vector_norms(taus: torch.Tensor) -> torch.Tensor:
    """‖τ_t‖_F of each task vector (T,), float64: ``sqrt(diag(flat_gram(taus)))``."""
    return flat_gram(taus).diagonal().clamp_min(0).sqrt()


def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Cosine-similarity matrix ``C[s, t] = G[s, t] / (‖τ_s‖ ‖τ_t‖)`` from a Gram matrix.

    A zero vector has cosine 0 with everything, itself included (no NaN in reports).
    """
    g = gram.to(torch.float64)
    d = g.diagonal().clamp_min(0).sqrt()
    denom = torch.outer(d, d)
    c = torch.where(denom > 0, g / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(g))
    c = c.clamp(-1.0, 1.0)
    c.diagonal().copy_((d > 0).to(torch.float64))
    return c


def cosine_similarity_matrix(taus: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity of the flattened task vectors of one key (T×T, float64).

    ``cos(τ_s, τ_t) = <vec τ_s, vec τ_t> / (‖τ_s‖_F ‖τ_t‖_F)``. For the whole model, sum
    ``flat_gram`` over keys and apply ``cosine_from_gram`` (streaming; no concatenation).
    """
    return cosine_from_gram(flat_gram(taus))


def mean_off_diagonal(c: torch.Tensor) -> float:
    """Mean of the off-diagonal entries of a square matrix (NaN for 1×1)."""
    n = c.shape[0]
    if n < 2:
        return float("nan")
    return float((c.sum() - c.diagonal().sum()) / (n * (n - 1)))


# =============================================================================================
# Spectra
# =============================================================================================

def stable_rank(s: torch.Tensor) -> float:
    """Stable rank ``‖M‖_F² / ‖M‖_2² = Σ σ_i² / σ_1²`` (0 for the zero matrix)."""
    s = s.to(torch.float64)
    if s.numel() == 0 or float(s.max()) <= 0:
        return 0.0
    return float((s * s).sum() / s.max() ** 2)


def effective_rank(s: torch.Tensor) -> float:
    """Effective rank (Roy & Vetterli, EUSIPCO 2007): ``exp(H(p))`` with ``p_i = σ_i / Σ_j σ_j``
    and ``H(p) = −Σ p_i log p_i`` (``0 log 0 = 0``). Equals r for r equal non-zero singular values;
    0 for the zero matrix."""
    s = s.to(torch.float64).clamp_min(0)
    total = s.sum()
    if s.numel() == 0 or float(total) <= 0:
        return 0.0
    p = s / total
    h = -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum()
    return float(torch.exp(h))


def fraction_below(s: torch.Tensor, rel: float = 0.01) -> float:
    """Fraction of the r singular values below ``rel · σ_1`` (1.0 for the zero matrix)."""
    s = s.to(torch.float64)
    if s.numel() == 0:
        return float("nan")
    top = float(s.max())
    if top <= 0:
        return 1.0
    return float((s < rel * top).sum()) / s.numel()


def spectrum_summary(s: torch.Tensor, n_top: int = 16, small: float = 0.01) -> dict[str, Any]:
    """Summary of one spectrum: the first ``n_top`` singular values, σ_1, ‖M‖_F, stable rank,
    effective rank, and the fraction of singular values below ``small · σ_1``."""
    s = s.to(torch.float64).cpu()
    return {
        "top": s[:n_top].tolist(),
        "sigma_max": float(s[0]) if s.numel() else 0.0,
        "frobenius": float(s.pow(2).sum().sqrt()),
        "stable_rank": stable_rank(s),
        "effective_rank": effective_rank(s),
        "fraction_below_1pct": fraction_below(s, small),
        "r": int(s.numel()),
    }


# =============================================================================================
# What the method did: each method declares it through its hooks (merging/methods/base.py)
# =============================================================================================

def _role_of(role: RoleInfo | Role | str | None) -> Role | None:
    if role is None:
        return None
    if isinstance(role, RoleInfo):
        return role.role
    return Role(role)


def method_class(method: str) -> type[MergeMethod]:
    """The class of the method ``method``. An unknown id gets the base class, whose hooks say what
    a method that declares nothing does: nothing truncated, directions ordered by the merged
    matrix, no orthogonalisation."""
    try:
        return get_method(method)
    except KeyError:
        return MergeMethod


def _typed_params(cls: type[MergeMethod], params: Mapping[str, Any] | None) -> MethodParams:
    """The method's typed parameters, from their JSON form in the report (an unknown method's
    parameters are not read: the base class's hooks ignore them)."""
    if cls is MergeMethod:
        return MethodParams()
    return cls.Params.model_validate(dict(params or {}))


def method_truncation(method: str, params: Mapping[str, Any] | None, shape: Sequence[int], n_tasks: int,
                      role: RoleInfo | Role | str | None = None) -> Truncation | None:
    """What ``method`` keeps of each task matrix of one key (``MergeMethod.truncation``), or None
    when it cuts nothing or the key is no matrix: not 2-D, or a role the SVD methods average
    (embeddings, LM heads, ``text_projection``). ``shape`` is (out, in)."""
    r_role = _role_of(role)
    if len(shape) != 2 or (r_role is not None and r_role in NON_MATRIX_2D_ROLES):
        return None
    cls = method_class(method)
    return cls.truncation(_typed_params(cls, params), (int(shape[0]), int(shape[1])), n_tasks, r_role)


def truncation_ranks(method: str, params: Mapping[str, Any] | None, shape: Sequence[int], n_tasks: int,
                     role: RoleInfo | Role | str | None = None) -> dict[str, Any] | None:
    """The rank each task keeps in a method's truncation of one matrix key, as the report states
    it: ``{"per_task": [k_1 … k_T], "common": k_c | None, "rule": str}``, or ``None`` when the
    method does not truncate task matrices (sum-type methods, unknown ids, non-matrix keys)."""
    trunc = method_truncation(method, params, shape, n_tasks, role)
    return None if trunc is None else trunc.report(n_tasks)


def sti_rank(m: int, n: int, n_tasks: int) -> int:
    """The rank k per task at which STI is computed for every method, so that values compare:
    TSV-M's ``int(r/T)`` (ALGORITHMS.md §1.1)."""
    return int(min(m, n) * (1 / n_tasks))


def energy_kept(s: torch.Tensor, k: int) -> float:
    """Energy kept by a rank-k truncation: ``Σ_{i<k} σ_i² / Σ_i σ_i²`` (NaN for the zero matrix)."""
    s = s.to(torch.float64)
    e = s * s
    total = float(e.sum())
    if total <= 0:
        return float("nan")
    return float(e[: max(int(k), 0)].sum()) / total


def iso_energy_kept(taus: torch.Tensor, u_common: torch.Tensor, s: int,
                    task_grams: torch.Tensor | None = None) -> list[float]:
    """Energy of each task that the Iso-CTS (or, with s = 0 and the full common space, Iso-C)
    subspaces keep (ALGORITHMS.md §2.1-2.2; our generalisation of Σ_{i<k} σ_i² / Σ σ_i²):

    ``(‖U_cᵀ Δ_t‖_F² + Σ_{i<s} σ_i(R_t)²) / ‖Δ_t‖_F²`` with ``U_c`` the common space (the top-k left
    singular vectors of Σ_t Δ_t, passed as ``u_common``, m×k) and ``R_t = Δ_t − U_c U_cᵀ Δ_t`` the
    residual whose top-s directions Iso-CTS adds for task t. Computed from small Gram matrices:
    ``R_tᵀR_t = Δ_tᵀΔ_t − C_tᵀC_t`` (C_t = U_cᵀΔ_t) when m ≥ n, ``R_tR_tᵀ = (I − U_cU_cᵀ) Δ_tΔ_tᵀ (I − U_cU_cᵀ)``
    otherwise. ``task_grams``: the tasks' small-side Gram matrices if already computed.
    For a tall layer the common space cannot hold all of Δ_t's column space, so Iso-C keeps < 1.
    """
    x = taus.to(u_common.dtype)
    n_tasks, m, n = x.shape
    c = u_common.mT @ x  # (T, k, n)
    common = c.pow(2).sum((-2, -1)).to(torch.float64)
    grams = task_grams.to(x.dtype) if task_grams is not None else (x.mT @ x if m >= n else x @ x.mT)
    total = grams.diagonal(dim1=-2, dim2=-1).sum(-1).to(torch.float64)
    if s > 0:
        if m >= n:
            rr = grams - c.mT @ c
        else:
            proj = torch.eye(m, dtype=x.dtype, device=x.device) - u_common @ u_common.mT
            rr = proj @ grams @ proj
        ev = torch.linalg.eigvalsh((rr + rr.mT) / 2).flip(-1).clamp_min(0)
        residual = ev[..., :s].sum(-1).to(torch.float64)
    else:
        residual = torch.zeros_like(common)
    kept = ((common + residual) / torch.where(total > 0, total, torch.ones_like(total))).clamp(max=1.0)
    return [float(v) if float(t) > 0 else float("nan") for v, t in zip(kept.cpu(), total.cpu())]


# =============================================================================================
# SAR: Subspace Alignment Ratio (Iso paper, ALGORITHMS.md §2.4)
# =============================================================================================

def sar_rank(s: torch.Tensor, threshold: float = SAR_THRESHOLD) -> int:
    """k_M of ``fig_3a.py``: ``argmax(sqrt(cumsum(S²)/ΣS²) > 0.95)``, the 0-based index of the
    first singular value whose cumulative *norm* fraction exceeds 0.95, **used as a count**
    (``U[:, :k_M]``). This reproduces the official off-by-one on purpose: it keeps one direction
    fewer than "the smallest k whose retained fraction exceeds 0.95". If no index qualifies (zero
    matrix: the ratio is NaN), numpy's argmax of an all-false array gives 0."""
    e = s.to(torch.float64).pow(2)
    frac = torch.sqrt(torch.cumsum(e, 0) / e.sum())
    hit = (frac > threshold).to(torch.uint8)
    return int(torch.argmax(hit)) if hit.numel() else 0


def iso_sar_rank(r: int, threshold: float = SAR_THRESHOLD) -> int:
    """k_iso of ``fig_3a.py`` for a flat spectrum of length r: ``argmax(sqrt((i+1)/r) > 0.95)``,
    again used as a count."""
    if r <= 0:
        return 0
    i = torch.arange(r, dtype=torch.float64)
    return int(torch.argmax((torch.sqrt((i + 1) / r) > threshold).to(torch.uint8)))


def subspace_alignment_ratio(taus: torch.Tensor, u: torch.Tensor, k: int) -> torch.Tensor:
    """``SAR(Δ_t; Δ_M) = ‖U_k U_kᵀ Δ_t‖_F / ‖Δ_t‖_F`` for each task (T,), float64; NaN for Δ_t = 0.

    ``u``: left singular vectors of the merged matrix (m × ≥k, orthonormal columns). Because U_k
    has orthonormal columns, ``‖U_k U_kᵀ Δ‖_F = ‖U_kᵀ Δ‖_F``.
    """
    x = taus.to(u.dtype)
    num = torch.linalg.vector_norm(u[:, :k].mT @ x, dim=(-2, -1)).to(torch.float64)
    den = torch.linalg.vector_norm(x, dim=(-2, -1)).to(torch.float64)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.full_like(den, float("nan"))).cpu()


def sar_basis(method: str, params: Mapping[str, Any] | None = None, role: RoleInfo | Role | str | None = None) -> SarBasis:
    """Which matrix orders the directions for SAR: ``"merged"`` or ``"task_sum"`` (the method's
    ``MergeMethod.sar_basis``).

    SAR keeps the leading k_M left singular vectors. Methods that flatten the spectrum of the
    merged matrix (Iso-C, Iso-CTS, ESM's ESD layers ``2·polar·polar``, and Subspace Boosting, which
    with its default β raises every σ to σ_1) leave those directions unordered: any basis of a
    degenerate singular space is an SVD. ``fig_3a.py`` uses the left singular vectors of the TA sum
    Σ_t Δ_t for Iso (the Iso-C merge has exactly those; Subspace Boosting on TA keeps them too;
    for Iso-CTS, ESM and boosted TIES/Consensus the sum is a proxy). Everything else: the merged
    matrix's own U."""
    cls = method_class(method)
    return cls.sar_basis(_typed_params(cls, params), _role_of(role))


def sar(taus: torch.Tensor, merged: torch.Tensor, *, merged_eig: SmallSideEig | None = None,
        basis: torch.Tensor | None = None, basis_eig: SmallSideEig | None = None,
        task_grams: torch.Tensor | None = None, task_sq_norms: torch.Tensor | None = None,
        threshold: float = SAR_THRESHOLD) -> dict[str, Any]:
    """SAR of every task against the merged matrix, and the Iso variant (ALGORITHMS.md §2.4).

    * ``U, S = svd(Δ_M)``; ``k_M = sar_rank(S)`` (official off-by-one, see ``sar_rank``).
    * ``sar[t] = ‖U_{k_M}ᵀ Δ_t‖_F / ‖Δ_t‖_F``.
    * Iso variant: the same U with a flat spectrum, ``k_iso = iso_sar_rank(r)``:
      ``sar_iso[t] = ‖U_{k_iso}ᵀ Δ_t‖_F / ‖Δ_t‖_F``. For an ``iso_c`` merge (flat spectrum) both
      coincide; for a TA sum, ``sar_iso`` is the SAR the Iso-C merge of the same tasks would have.
    * **Not** the ``fig_3a.py`` bug: ``U`` is computed once per layer, from Δ_M, and used for every
      task (the official loop overwrites ``U_iso_k`` with the previous task's basis).
    * ``basis``: the matrix whose left singular vectors U are used, when it is not Δ_M itself
      (``sar_basis``: the TA sum for merges with a flattened spectrum). k_M always comes from the
      spectrum of Δ_M.

    Directions whose merged singular value is numerically zero (σ_i ≤ tol·σ_1, tol = 1e-3 for a
    float32 Gram, 1e-7 in float64) are arbitrary in any SVD, so U is cut to those above it:
    ``k_used``/``k_iso_used`` < ``k_M``/``k_iso`` only for a rank-deficient Δ_M (e.g. a TSV-M merge
    with r < T). ``task_grams``: the tasks' small-side Gram matrices Δ_tΔ_tᵀ when m < n (then the
    projected energies are ``u_iᵀ (Δ_tΔ_tᵀ) u_i``, which is cheaper than forming U_kᵀΔ_t).
    ``task_sq_norms``: ‖Δ_t‖_F² if already known (e.g. traces of the task Gram matrices).
    """
    n_tasks, m, n = taus.shape
    r = min(m, n)
    m_eig = merged_eig if merged_eig is not None else small_side_eig(merged)
    k_m = sar_rank(m_eig.s, threshold)
    k_iso = iso_sar_rank(r, threshold)
    if basis is None:
        basis, eig = merged, m_eig
    else:
        eig = basis_eig if basis_eig is not None else small_side_eig(basis)
    s = eig.s
    tol = 1e-3 if eig.gram.dtype == torch.float32 else 1e-7
    rank = int((s > tol * s[0]).sum()) if s.numel() and float(s[0]) > 0 else 0
    kmax = min(max(k_m, k_iso), rank)
    x = taus.to(eig.gram.dtype)
    if kmax == 0:
        cum = torch.zeros((n_tasks, 1), dtype=torch.float64)
    else:
        if eig.side == "left":
            u = eig.vecs[:, :kmax]
            if task_grams is not None:
                energy = ((task_grams.to(u.dtype) @ u) * u).sum(-2)  # (T, kmax): u_iᵀ G_t u_i
            else:
                energy = (u.mT @ x).pow(2).sum(-1)
        else:
            u, _, _ = top_factors(basis, eig, kmax)
            energy = (u.mT @ x).pow(2).sum(-1)  # (T, kmax)
        cum = torch.cat([torch.zeros((n_tasks, 1), dtype=torch.float64),
                         torch.cumsum(energy.to(torch.float64).clamp_min(0), 1).cpu()], dim=1)
    if task_sq_norms is None:
        task_sq_norms = torch.linalg.vector_norm(x, dim=(-2, -1)).to(torch.float64) ** 2
    total = task_sq_norms.to(torch.float64).cpu()

    def ratio(k: int) -> list[float]:
        k = min(k, kmax)
        return [float(math.sqrt(min(float(cum[t, k]) / float(total[t]), 1.0))) if float(total[t]) > 0 else float("nan")
                for t in range(n_tasks)]

    return {"k_M": k_m, "k_used": min(k_m, kmax), "k_iso": k_iso, "k_iso_used": min(k_iso, kmax), "r": r,
            "sar": ratio(k_m), "sar_iso": ratio(k_iso)}


# =============================================================================================
# STI: Singular Task Interference (TSV paper, ALGORITHMS.md §1.4; reconstructed)
# =============================================================================================

STI_LABEL = "reconstructed, normalisation uncertain (ALGORITHMS.md §1.4)"


def singular_task_interference(u_cat: torch.Tensor, s_cat: torch.Tensor, v_cat: torch.Tensor) -> float:
    """``STI = ‖(UᵀU − I) Σ (VᵀV − I)‖_1`` (entrywise L1), with ``U = [U_1 … U_T]`` (m×K),
    ``Σ = diag(s_cat)`` (K) = blockdiag(Σ_1 … Σ_T) and ``V = [V_1 … V_T]`` (n×K, singular vectors as
    columns). Zero when the concatenated left or right singular vectors are orthonormal.
    Reconstructed from memory of the TSV paper; the normalisation is uncertain (§1.4)."""
    if s_cat.numel() == 0:
        return 0.0
    dtype = torch.promote_types(u_cat.dtype, torch.float32)
    u, v = u_cat.to(dtype), v_cat.to(dtype)
    return sti_from_grams(u.mT @ u, s_cat, v.mT @ v)


def sti_from_grams(gu: torch.Tensor, s_cat: torch.Tensor, gv: torch.Tensor) -> float:
    """STI from the Gram matrices ``gu = UᵀU`` and ``gv = VᵀV`` of the concatenated factors:
    ``‖(gu − I) diag(s_cat) (gv − I)‖_1``."""
    k = s_cat.numel()
    if k == 0:
        return 0.0
    eye = torch.eye(k, dtype=gu.dtype, device=gu.device)
    return float((((gu - eye) * s_cat.to(gu.dtype)) @ (gv - eye)).abs().sum().to(torch.float64))


def task_factors(taus: torch.Tensor, k: int, eigs: Sequence[SmallSideEig] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenated top-k singular factors of the T task matrices:
    ``U_cat (m × Tk)``, ``s_cat (Tk,)``, ``V_cat (n × Tk)`` (task blocks in order)."""
    eigs = eigs if eigs is not None else [small_side_eig(t) for t in taus]
    us, ss, vs = zip(*(top_factors(taus[t], eigs[t], k) for t in range(taus.shape[0])))
    return torch.cat(us, dim=1), torch.cat(ss), torch.cat(vs, dim=1)


def sti_before_after(taus: torch.Tensor, k: int, orthogonalised: bool,
                     eigs: Sequence[SmallSideEig] | None = None, explicit_polar: bool = False) -> dict[str, Any]:
    """STI of the per-task rank-k factors before merging, and of the factors the merge implies.

    * before: ``singular_task_interference(U_cat, s_cat, V_cat)`` of the truncated task factors
      (k per task; the collector uses TSV's k = int(r/T) for every method so values compare).
    * after, ``orthogonalised=True`` (TSV-M, Iso-C/CTS, ESM replace the factors by orthonormal
      ones): the same formula on ``polar(U_cat)``, ``s_cat``, ``polar(V_cat)``. Zero in exact
      arithmetic; the value shows the rounding level (in float32 about 1e-5 of "before"). By
      default the Gram matrices of the polar factors come from ``polar_gram`` (no m×K product);
      ``explicit_polar=True`` forms ``merging.linalg.polar`` of both factors instead (which
      computes in float64 internally: rounding level ~1e-9; 3-5x the cost).
    * after, otherwise (sum-type merges): ``Σ_t U_t Σ_t V_tᵀ = U_cat Σ V_catᵀ`` keeps the task
      factors, so after = before.
    ``*_per_sigma``: the value divided by ``Σ s_cat`` (our scale-free variant, for comparing layers).
    """
    if k <= 0:
        return {"k": 0, "before": None, "after": None, "after_basis": None, "label": STI_LABEL}
    u_cat, s_cat, v_cat = task_factors(taus, k, eigs)
    dtype = torch.promote_types(u_cat.dtype, torch.float32)
    u_cat, v_cat = u_cat.to(dtype), v_cat.to(dtype)
    gu, gv = u_cat.mT @ u_cat, v_cat.mT @ v_cat
    before = sti_from_grams(gu, s_cat, gv)
    if orthogonalised:
        if explicit_polar:
            after = singular_task_interference(polar(u_cat), s_cat, polar(v_cat))
        else:
            after = sti_from_grams(polar_gram(gu), s_cat, polar_gram(gv))
        basis = "polar-orthogonalised task factors"
    else:
        after, basis = before, "task factors (a sum keeps them)"
    scale = float(s_cat.to(torch.float64).sum())
    return {"k": k, "before": before, "after": after, "after_basis": basis,
            "before_per_sigma": before / scale if scale > 0 else None,
            "after_per_sigma": after / scale if scale > 0 else None, "label": STI_LABEL}


# =============================================================================================
# Rank collapse of sum-type merges
# =============================================================================================

def rank_collapse(merged_s: torch.Tensor, task_s: torch.Tensor | Sequence[torch.Tensor], small: float = 0.01) -> dict[str, Any]:
    """Rank-collapse indicator (our definition).

    * ``erank_ratio = effective_rank(Δ_M) / mean_t effective_rank(Δ_t)``. T tasks in mutually
      orthogonal subspaces sum to a matrix with up to T times one task's effective rank, so a
      healthy sum has a ratio well above 1; a ratio near or below 1 means the merge concentrates
      on fewer directions than a single task uses: the collapse Subspace Boosting targets (§3).
    * ``merged_fraction_below_1pct``: fraction of Δ_M's r singular values below 1 % of its σ_1,
      next to the same fraction averaged over the task matrices (``task_fraction_below_1pct``).
    """
    tasks = [t.to(torch.float64) for t in task_s]
    eranks = [effective_rank(t) for t in tasks]
    mean_task = sum(eranks) / len(eranks) if eranks else float("nan")
    em = effective_rank(merged_s)
    return {
        "merged_effective_rank": em,
        "task_effective_rank_mean": mean_task,
        "erank_ratio": em / mean_task if mean_task and mean_task > 0 else None,
        "merged_fraction_below_1pct": fraction_below(merged_s, small),
        "task_fraction_below_1pct": sum(fraction_below(t, small) for t in tasks) / len(tasks) if tasks else None,
    }


# =============================================================================================
# HO-GSVD task similarity (Subspace Boosting paper's analysis, ALGORITHMS.md §3.3; our reconstruction)
# =============================================================================================

HOGSVD_LABEL = ("our reconstruction: HO-GSVD (Ponnapalli et al. 2011) with the Kempf-Goulart-Duncan "
                "regularisation A_i = D_iᵀD_i + π·AᵀA; the paper's exact per-task quantity is unknown (ALGORITHMS.md §3.3)")


def isolated_eigenvalue(n: int, pi: float) -> float:
    """The HO-GSVD eigenvalue of a direction that belongs to one of the n matrices only (with the
    π regularisation): ``((1 + nπ)(1/(1+π) + (n−1)/π) − n) / (n(n−1))`` (≈ 1/(nπ))."""
    return ((1 + n * pi) * (1 / (1 + pi) + (n - 1) / pi) - n) / (n * (n - 1))


def _split_degenerate(evals: torch.Tensor, vecs: torch.Tensor, at: torch.Tensor, rel_tol: float) -> torch.Tensor:
    """Inside each cluster of equal eigenvalues (|λ_a − λ_b| ≤ rel_tol·λ_b, consecutive), rotate the
    eigenvectors to diagonalise ``Σ_i w_i Ã_i`` with distinct weights w_i. A degenerate eigenspace
    is otherwise returned in an arbitrary basis: e.g. all directions isolated in one matrix share
    λ_isolated, whichever matrix owns them, and this separates them by owner."""
    n_mat = at.shape[0]
    weights = torch.arange(1, n_mat + 1, dtype=at.dtype, device=at.device) / n_mat
    mix = (at * weights.reshape(-1, 1, 1)).sum(0)
    out = vecs.clone()
    start, k = 0, evals.numel()
    while start < k:
        end = start + 1
        while end < k and float(evals[end] - evals[end - 1]) <= rel_tol * float(evals[end].abs()):
            end += 1
        if end - start > 1:
            wc = vecs[:, start:end]
            b = wc.mT @ mix @ wc
            _, rot = torch.linalg.eigh((b + b.mT) / 2)
            out[:, start:end] = wc @ rot
        start = end
    return out


def hogsvd(mats: torch.Tensor | None = None, *, grams: torch.Tensor | None = None, pi: float = 1e-3,
           common_tol: float = 1e-2, isolated_tol: float = 0.1, max_dim: int | None = None,
           rank_tol: float | None = None) -> dict[str, Any]:
    """Regularised higher-order GSVD of N matrices D_i (m_i × n) sharing a right basis V.

    Definitions (ALGORITHMS.md §3.3):
    ``A_i = D_iᵀD_i``, ``A = [D_1; …; D_N]`` (so ``AᵀA = Σ A_i``), ``A_i,π = A_i + π·AᵀA``,
    ``S_π = 1/(N(N−1)) Σ_{i≠j} A_i,π A_j,π⁻¹``, ``S_π V = V Λ``, ``B_i = D_i V^{-T}``,
    ``σ_{i,k} = ‖b_{i,k}‖`` with unit-length columns of V (Ponnapalli's normalisation).
    All λ_k ≥ 1; λ_k = 1 marks the common subspace (every D_i has the same σ_{i,k}), and
    ``isolated_eigenvalue(N, π)`` a direction owned by a single D_i.

    How it is computed (exact, symmetric, float64): the eigenvalues of S_π are invariant under
    D_i → D_i M for invertible M, so we first restrict to the row space of A (dropping eigenvalues of
    AᵀA below ``rank_tol``·λ_max: 1e-10, or 1e-5 when the Gram matrices arrive in float32) and
    whiten it: ``Ã_i = Mᵀ A_i M`` with ``M = W Λ^{-1/2}``, so ``Σ_i Ã_i = I`` and
    ``Σ_i Ã_i,π = (1 + Nπ) I``. Because ``Σ_{i≠j} X_i X_j⁻¹ = (Σ X_i)(Σ X_j⁻¹) − N I``,
    ``S̃_π = ((1 + Nπ) Σ_j (Ã_j + πI)⁻¹ − N I) / (N(N−1))`` is symmetric: one ``eigh`` gives Λ and
    an orthonormal W̃ (degenerate eigenspaces, such as all isolated directions, are split by
    diagonalising ``Σ_i w_i Ã_i`` inside them); ``V = W Λ^{1/2} W̃`` (columns normalised) and
    ``σ_{i,k}² = (w̃_kᵀ Ã_i w̃_k) · ‖Λ^{1/2} w̃_k‖²``. ``max_dim`` optionally keeps only the top
    ``max_dim`` principal directions of AᵀA (the HO-GSVD of the D_i projected on them; the energy
    share they hold is returned as ``energy_retained``).

    Task similarity (our choice, documented): ``p_{i,k} = σ_{i,k} / Σ_j σ_{j,k}`` is the share of
    direction k that belongs to task i (invariant to how V's columns are scaled); the similarity of
    tasks i and j is the cosine of their profiles ``p_i, p_j`` over all k. Identical tasks give 1;
    tasks that live in disjoint isolated subspaces give ~0 plus what the common directions add.

    Returns tensors (CPU, float64): ``eigenvalues`` (ρ, ascending), ``V`` (n×ρ), ``sigma`` (N×ρ),
    ``profile`` (N×ρ), ``similarity`` (N×N), plus ``common`` (indices with λ ≤ 1 + common_tol),
    ``isolated`` (indices with λ ≥ (1 − isolated_tol)·λ_isolated) and ``isolated_owner`` (the task
    holding each), ``lambda_isolated``, ``reduced_dim`` ρ, ``n``, ``pi``, ``energy_retained``, ``label``.
    """
    if grams is None:
        if mats is None:
            raise ValueError("hogsvd needs mats or grams")
        d = mats.to(torch.float64)
        grams = d.mT @ d
    in_dtype = grams.dtype
    if in_dtype not in (torch.float32, torch.float64):
        grams, in_dtype = grams.float(), torch.float32
    n_mat, n = grams.shape[0], grams.shape[-1]
    if n_mat < 2:
        raise ValueError("hogsvd needs at least 2 matrices")
    if rank_tol is None:
        rank_tol = 1e-5 if in_dtype == torch.float32 else 1e-10
    total = grams.sum(0, dtype=torch.float64)
    total = (total + total.mT) / 2
    lam_a, w = torch.linalg.eigh(total)
    lam_a, w = lam_a.flip(0), w.flip(1)
    lam_max = float(lam_a[0]) if lam_a.numel() else 0.0
    keep = int((lam_a > rank_tol * lam_max).sum()) if lam_max > 0 else 0
    if max_dim is not None:
        keep = min(keep, int(max_dim))
    if keep == 0:
        raise ValueError("hogsvd: all matrices are zero")
    energy_retained = float(lam_a[:keep].sum() / lam_a.clamp_min(0).sum())
    w, lam = w[:, :keep], lam_a[:keep]
    m_white = w / lam.sqrt()
    # Whitening products in the input precision (the dominant cost): a float32 Gram carries no more.
    mw = m_white.to(in_dtype)
    at = (mw.mT @ grams @ mw).to(torch.float64)  # (N, ρ, ρ), Σ_i Ã_i = I
    at = (at + at.mT) / 2
    eye = torch.eye(keep, dtype=torch.float64, device=at.device)
    c = at + pi * eye
    inv = torch.cholesky_inverse(torch.linalg.cholesky(c))
    s_tilde = ((1 + n_mat * pi) * inv.sum(0) - n_mat * eye) / (n_mat * (n_mat - 1))
    s_tilde = (s_tilde + s_tilde.mT) / 2
    evals, wt = torch.linalg.eigh(s_tilde)  # ascending: common subspace first
    wt = _split_degenerate(evals, wt, at, 1e-3 if in_dtype == torch.float32 else 1e-7)
    shares = ((at @ wt) * wt).sum(-2).clamp_min(0)  # (N, ρ): w̃_kᵀ Ã_i w̃_k, sums to 1 over i
    v = w @ (lam.sqrt().unsqueeze(1) * wt)
    col = torch.linalg.vector_norm(v, dim=0)
    v = v / col
    sigma = shares.sqrt() * col
    colsum = sigma.sum(0)
    profile = torch.where(colsum > 0, sigma / torch.where(colsum > 0, colsum, torch.ones_like(colsum)), torch.zeros_like(sigma))
    pn = torch.linalg.vector_norm(profile, dim=1, keepdim=True)
    unit = profile / torch.where(pn > 0, pn, torch.ones_like(pn))
    similarity = (unit @ unit.mT).clamp(-1, 1)
    lam_iso = isolated_eigenvalue(n_mat, pi)
    common = [int(i) for i in torch.nonzero(evals <= 1 + common_tol).flatten()]
    isolated = [int(i) for i in torch.nonzero(evals >= (1 - isolated_tol) * lam_iso).flatten()]
    owner = [int(torch.argmax(shares[:, i])) for i in isolated]
    evals, v, sigma, shares, profile, similarity = (t.cpu() for t in (evals, v, sigma, shares, profile, similarity))
    return {"eigenvalues": evals, "V": v, "sigma": sigma, "shares": shares, "profile": profile, "similarity": similarity,
            "common": common, "isolated": isolated, "isolated_owner": owner, "lambda_isolated": lam_iso,
            "reduced_dim": keep, "n": n, "pi": pi, "common_tol": common_tol, "isolated_tol": isolated_tol,
            "energy_retained": energy_retained, "label": HOGSVD_LABEL}


# =============================================================================================
# Helpers
# =============================================================================================

def profile_indices(r: int, points: int = 48) -> list[int]:
    """Up to ``points`` distinct 0-based indices in [0, r), spaced geometrically (dense at the top
    of the spectrum), always including 0 and r − 1: where a spectrum is sampled for plots."""
    if r <= 0:
        return []
    if r <= points:
        return list(range(r))
    idx = sorted({min(r - 1, int(round(math.exp(math.log(r) * i / (points - 1)))) - 1) for i in range(points)} | {0, r - 1})
    return [max(0, i) for i in idx]
