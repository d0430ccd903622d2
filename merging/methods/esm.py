"""ESM, Essential Subspace Merging with polarized scaling (Li et al., CVPR 2026), ViT code path,
ALGORITHMS.md §4.

ESD layers (fused or split Q/K/V, MLP up/gate and down projections) are decomposed along the
principal directions of each task's activation shift A_t = X_t ΔW_tᵀ. Only XᵀX and N are
needed: AᵀA = ΔW (XᵀX) ΔWᵀ. The eigenpairs are computed in float64 on the small side of the
layer, and the official identity padding (N < d_out) is reproduced: padded directions have
zero eigenvalue and enter the per-task norm n_t with the raw rows of ΔW_t.
Other 2-D keys use TSV-M, other tensors the mean. After the merge pass, each ESD/attention
group of layers is rescaled by (‖τ_ℓ‖ / mean_ℓ ‖τ_ℓ‖)^p. α multiplies ESD keys only.
"""
from __future__ import annotations

import contextlib
import threading

import torch
from pydantic import Field

from merging.alpha import ESM_GOLDEN
from merging.errors import CalibrationError
from merging.linalg import gram as gram_of, polar_times, polar_with_singular_values, top_eigh
from merging.methods.base import MergeContext, MergeMethod, MethodParams, SarBasis, TensorJob, Truncation
from merging.methods.registry import register
from merging.methods.tsv_m import tsv_merge_matrix, tsvm_rank
from merging.roles import Role, RoleInfo

ESD_ROLES = frozenset({Role.attn_qkv, Role.attn_q, Role.attn_k, Role.attn_v, Role.mlp_up, Role.mlp_gate, Role.mlp_down})
# Inter-layer scaling groups: the ESD roles plus the attention output (as in the official code).
GROUP_ROLES = ESD_ROLES | {Role.attn_out}


class EsmParams(MethodParams):
    alpha: float = Field(1.0, ge=-10, le=10, allow_inf_nan=False,
                         description="Scale of the ESD layers only; all other keys are added with coefficient 1 (official).")
    eigenvalue_power: float = Field(0.15, ge=0, le=2, description="q in the eigenvalue weighting (λ/mean λ)^q.")
    norm_power: float = Field(2.0, ge=0, le=8, description="p of the polarized scalings (inter-task, column, inter-layer).")
    final_factor: float = Field(2.0, gt=0, le=10, description="Constant factor of the ESD result (hard-coded 2 officially).")
    inter_layer_scaling: bool = Field(True, description="Rescale each layer group by (‖τ_ℓ‖/mean ‖τ‖)^p.")


def esd_rank(d_out: int, n_tasks: int) -> int:
    """Directions each task keeps of an ESD layer: int(d_out / T) (§4.2)."""
    return int(d_out * (1 / n_tasks))


def activation_eigen(dw: torch.Tensor, gram: torch.Tensor, count: int, r: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Top-r eigenvectors E (d_out, r) and eigenvalues λ (r,) of the activation-shift covariance
    AᵀA/(N−1) = ΔW G ΔWᵀ/(N−1), with the official identity padding, the projection Eᵀ ΔW (r, d_in),
    and n_t = ‖Eᵀ ΔW‖_F over the official full (padded) basis. Everything in float64.
    """
    d_out, d_in = dw.shape
    # Eigenpairs needed: the top r, and for n_t with N < d_out the first N (the official SVD's directions).
    need = min(d_out, r if count >= d_out else max(r, count))
    n_svd = min(count, d_out)  # the official SVD of A (N × d_out) yields min(N, d_out) directions
    if d_out <= d_in:
        evals, vecs = top_eigh(dw @ gram @ dw.mT, need)  # (d_out, d_out)
        evals, vecs = evals.flip(0).clamp_min(0)[:n_svd], vecs.flip(1)[:, :n_svd]
        proj = vecs.mT @ dw
    else:
        vecs, evals, proj = _eigen_from_small_side(dw, gram, min(need, d_in, n_svd))
    if vecs.shape[1] < r:  # rank budget above the available directions (ill-posed, §4.3): complete the basis
        vecs, evals = _complete(vecs, evals, r, count, d_out)
        proj = torch.cat([proj, vecs[:, proj.shape[0]:].mT @ dw])
    if count >= d_out:
        norm2 = float((dw * dw).sum())  # full orthonormal basis
    else:  # identity columns pad the official basis: n_t takes ΔW's raw rows there
        p_svd = proj[: min(vecs.shape[1], n_svd)]
        norm2 = float((p_svd * p_svd).sum() + (dw[count:] * dw[count:]).sum())
    return vecs[:, :r], evals[:r] / (count - 1), proj[:r], norm2 ** 0.5


def _eigen_from_small_side(dw: torch.Tensor, gram: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs of B Bᵀ = ΔW G ΔWᵀ for a tall ΔW (d_out > d_in), from those of the small
    Bᵀ B with B = ΔW L for a square root L Lᵀ = G: Bᵀ B = Lᵀ C L with C = ΔWᵀ ΔW, and for an
    eigenpair (μ, w) of Bᵀ B, e = B w / √μ = ΔW (L w / √μ) and eᵀ ΔW = (L w / √μ)ᵀ C. Only C and
    E touch the d_out side (a syrk and one d_out × d_in × k product), where forming B and Eᵀ ΔW
    took two more of d_out × d_in² size: 9.0 → 6.3 GFLOP per task on a 3072 × 768 c_fc.
    Returns (E (d_out, k'), μ (k',), Eᵀ ΔW (k', d_in)), k' ≤ k: directions of zero μ are dropped."""
    root = _gram_root(gram)
    c = gram_of(dw)
    mu, w = top_eigh(root.mT @ c @ root, k)
    mu, w = mu.flip(0).clamp_min(0), w.flip(1)
    s = mu.sqrt()
    keep = s > s[0] * 1e-12 if s.numel() and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    coef = (root @ w[:, keep]) / s[keep]  # (d_in, k')
    return dw @ coef, mu[keep], coef.mT @ c


def _gram_root(gram: torch.Tensor) -> torch.Tensor:
    """A square root L of the calibration Gram G (L Lᵀ = G): its Cholesky factor, or G^{1/2} from
    the eigendecomposition when G is singular. B Bᵀ = ΔW G ΔWᵀ whichever root is used, so the
    activation-shift eigenpairs are the same; Cholesky costs a twentieth of an eigh at d = 768."""
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0 and bool(torch.isfinite(chol).all()):
        return chol
    g_evals, g_vecs = torch.linalg.eigh(gram)
    return (g_vecs * g_evals.clamp_min(0).sqrt()) @ g_vecs.mT


def _complete(vecs: torch.Tensor, evals: torch.Tensor, r: int, count: int, d_out: int):
    """Add zero-eigenvalue directions: orthonormal completions inside the first N positions, then e_N, e_N+1, …"""
    need = r - vecs.shape[1]
    eye = torch.eye(d_out, dtype=vecs.dtype, device=vecs.device)
    extra = []
    if count < d_out:
        extra.append(eye[:, count:])
    basis = torch.cat([vecs, *extra], dim=1) if extra else vecs
    if basis.shape[1] < r:
        q, _ = torch.linalg.qr(torch.cat([vecs, eye], dim=1))
        basis = torch.cat([vecs, q[:, vecs.shape[1]: vecs.shape[1] + r - basis.shape[1]], *extra], dim=1)
    pad = torch.zeros(need, dtype=evals.dtype, device=evals.device)
    return basis[:, :r], torch.cat([evals, pad])


@register
class Esm(MergeMethod):
    name = "esm"
    alpha_search = ESM_GOLDEN
    summary = "Essential Subspace Merging: activation-shift eigenbasis per task, polarized scaling (needs calibration inputs)."
    Params = EsmParams
    needs_calibration = True
    # A 3072-wide ESD layer holds ~0.4 GB of float64 work arrays (the concatenated eigenbasis, its
    # Gram matrix, eigenvectors, LAPACK workspace), allocated and freed per task and per layer.
    # Left to glibc's heap, two workers' arrays took a 12-block ViT-B/16 merge to 1.5 GB peak
    # RSS; the arrays of 8 MB or more given back as they are freed, 1.3 GB, so ESM runs one
    # worker per core like the others.
    # The polar factor of the widest layers' eigenbasis is the peak (3072²: its Gram matrix,
    # eigenvectors, LAPACK workspace and products, +0.45 GB of RSS each, measured): two workers
    # never run two of those at once, while a smaller layer's may run beside one.
    unmap_freed_arrays = True
    orthogonalises = True

    def __init__(self, params: EsmParams, ctx: MergeContext):
        super().__init__(params, ctx)
        self.ill_posed: list[str] = []
        self.largest_out: int | None = None  # the widest ESD layer's output size (set by check_plan)
        self.largest_polar = threading.Lock()

    @staticmethod
    def is_esd(role: RoleInfo, shape: tuple[int, ...]) -> bool:
        return len(shape) == 2 and role.role in ESD_ROLES

    def check_plan(self, keys) -> None:
        esd = [(k, role, shape) for k, role, shape in keys if self.is_esd(role, shape)]
        needed = [(k, shape[0] if role.transposed else shape[1]) for k, role, shape in esd]
        self.largest_out = max((shape[1] if role.transposed else shape[0] for _, role, shape in esd), default=None)
        if not needed:
            raise CalibrationError("esm: no layer has an ESD role (attention Q/K/V, MLP up/gate/down); "
                                   "check the key names or set roles in the spec")
        self.ctx.calibration.require(needed)

    def alpha_scaled(self, job: TensorJob) -> bool:
        return self.is_esd(job.role, tuple(job.taus.shape[1:]))  # §4.6: α scales only the ESD keys

    def rescale_group(self, job: TensorJob) -> str | None:
        if self.params.inter_layer_scaling and job.taus.ndim == 3 and job.role.role in GROUP_ROLES:
            return job.role.role.value
        return None

    def group_factors(self, norms: dict[str, dict[str, float]]) -> dict[str, float]:
        factors = {}
        for group in norms.values():
            mean = sum(group.values()) / len(group)
            for key, n in group.items():
                factors[key] = (n / mean) ** self.params.norm_power if mean > 0 else 1.0
        return factors

    @classmethod
    def truncation(cls, params: EsmParams, shape: tuple[int, int], n_tasks: int, role: Role | None) -> Truncation:
        # The ranks count activation-eigen directions, not the task matrix's singular vectors, so
        # the singular-value energy they keep is an upper bound. (The report has always said so for
        # the non-ESD matrices too, which TSV-M merges: kept as it was.)
        caveat = "ESD keeps activation-eigen directions"
        if role is None or role in ESD_ROLES:  # an unknown role is taken as ESD
            return Truncation(esd_rank(shape[0], n_tasks), "esm: int(d_out/T) activation-eigen directions (ESD layer)",
                              upper_bound=caveat)
        return Truncation(tsvm_rank(*shape, n_tasks), "esm: TSV-M int(r/T) (non-ESD matrix)", upper_bound=caveat)

    @classmethod
    def sar_basis(cls, params: EsmParams, role: Role | None) -> SarBasis:
        # ESD layers are 2·polar·polar, a flat spectrum: their directions are ordered by the task sum
        return "task_sum" if role is None or role in ESD_ROLES else "merged"

    def merge(self, job: TensorJob):
        shape = tuple(job.taus.shape[1:])
        if not self.is_esd(job.role, shape):
            return tsv_merge_matrix(job.taus) if job.is_matrix else job.taus.mean(0)
        return self._esd_merge(job).to(job.taus.dtype)

    def _esd_merge(self, job: TensorJob) -> torch.Tensor:
        p, q = self.params.norm_power, self.params.eigenvalue_power
        n_tasks, d_out, d_in = job.taus.shape
        r = esd_rank(d_out, n_tasks)
        if r == 0:
            return torch.zeros((d_out, d_in), dtype=torch.float64, device=job.taus.device)
        u_blocks, v_blocks, norms = [], [], []
        for t in range(n_tasks):
            gram, count = self.ctx.calibration.stats(t, job.key, d_in)
            if r > min(count, d_in):
                self.ill_posed.append(job.key)
                self.ctx.notes.setdefault("esm_ill_posed_rank_budget", sorted(set(self.ill_posed)))
            dw = job.taus[t].to(torch.float64)  # one task at a time: a float64 copy of all T would double the job's memory
            e, lam, v, n_t = activation_eigen(dw, gram.to(dw.device), count, r)
            v *= n_t ** p
            mean_lam = lam.mean()
            weight = (lam / mean_lam) ** q if mean_lam > 0 else torch.ones_like(lam)
            weight = weight / weight.mean() if weight.mean() > 0 else torch.ones_like(weight)
            u_blocks.append(e * weight)
            v_blocks.append(weight[:, None] * v)
            norms.append(n_t)
        u_cat = torch.cat(u_blocks, dim=1)
        v_cat = torch.cat(v_blocks, dim=0)
        mean_norm = sum(norms) / len(norms)
        if mean_norm > 0:
            v_cat = v_cat / mean_norm ** p
        col = torch.linalg.vector_norm(v_cat, dim=0)
        mean_col = col.mean()
        if mean_col > 0:
            v_cat = v_cat * (col / mean_col) ** p
        # ESM works in float64 throughout; the SVD route is kept for float64 compute mode only.
        exact = job.taus.dtype == torch.float64
        del u_blocks, v_blocks
        pv, sv = polar_with_singular_values(v_cat, exact)
        largest = self.largest_out is not None and d_out >= self.largest_out
        with self.largest_polar if largest else contextlib.nullcontext():
            pu_pv, su = polar_times(u_cat, pv, exact)  # polar(U) @ polar(V) without forming polar(U)
        return (self.params.final_factor * float(su.mean()) * float(sv.mean())) * pu_pv
