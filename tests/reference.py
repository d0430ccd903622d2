"""Straightforward float64 re-statements of the official per-layer functions (ALGORITHMS.md),
written to mirror the official code's structure (full SVDs, zero-padded buffers), as a test
oracle for shapes and task counts that the golden files do not cover. Not used by the product.
"""
from __future__ import annotations

import torch


def _svd(a):
    return torch.linalg.svd(a, full_matrices=False)


def tsvm(tvs: list[torch.Tensor]) -> torch.Tensor:
    T = len(tvs)
    m, n = tvs[0].shape
    r = min(m, n)
    k = int(r * (1 / T))
    sum_u = torch.zeros(m, r, dtype=torch.float64)
    sum_s = torch.zeros(r, dtype=torch.float64)
    sum_v = torch.zeros(r, n, dtype=torch.float64)
    for i, tv in enumerate(tvs):
        u, s, v = _svd(tv)
        sum_u[:, i * k:(i + 1) * k] = u[:, :k]
        sum_s[i * k:(i + 1) * k] = s[:k]
        sum_v[i * k:(i + 1) * k, :] = v[:k, :]
    uu, _, vu = _svd(sum_u)
    uv, _, vv = _svd(sum_v)
    return torch.linalg.multi_dot([uu, vu, torch.diag(sum_s), uv, vv])


def iso_c(tvs):
    u, s, v = _svd(sum(tvs))
    return s.mean() * u @ v


def iso_cts(tvs, f=0.8):
    T = len(tvs)
    m, n = tvs[0].shape
    r = min(m, n)
    k0 = int(r * f)
    s_per = round((r - k0) / T)
    k = r - s_per * T
    if s_per == 0:
        return iso_c(tvs)
    u, s, v = _svd(sum(tvs))
    uc, sc, vc = u[:, :k], s[:k], v[:k]
    us, ss, vs = [], [], []
    for tv in tvs:
        res = tv - uc @ uc.T @ tv
        ut, st, vt = _svd(res)
        us.append(ut[:, :s_per]); ss.append(st[:s_per]); vs.append(vt[:s_per])
    U = torch.cat(us + [uc], 1); S = torch.cat(ss + [sc]); V = torch.cat(vs + [vc], 0)
    pu, _, qu = _svd(U); pv, _, qv = _svd(V)
    return S.mean() * (pu @ qu) @ (pv @ qv)


def sb(m, beta):
    u, s, v = _svd(m)
    ratio = torch.cumsum(s, 0) / s.sum()
    c = int(torch.nonzero(ratio >= beta)[0])
    return u @ torch.diag(torch.clamp(s, min=s[c])) @ v


def ties(tv_dicts: list[dict], K=20, merge_func="mean"):
    keys = sorted(tv_dicts[0])
    flat = torch.stack([torch.cat([d[k].reshape(-1) for k in keys]) for d in tv_dicts])
    d = flat.shape[1]
    kk = d - int(d * (K / 100))
    thr = flat.abs().kthvalue(kk, dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= thr)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    sel = trimmed * keep
    agg = sel.sum(0)
    if merge_func == "mean":
        agg = agg / (sel != 0).sum(0).float().clamp(min=1)
    out, off = {}, 0
    for k in keys:
        n = tv_dicts[0][k].numel()
        out[k] = agg[off:off + n].reshape(tv_dicts[0][k].shape)
        off += n
    return out


def consensus(tvs, lam, k):
    total = sum(tvs)
    masks = [tv.abs() > l * (total - tv).abs() for tv, l in zip(tvs, lam)]
    return total * (sum(m.int() for m in masks) >= k)


def make_task_vectors(shapes: dict[str, tuple], T: int, seed: int, rc=4, r=6, scale=0.01, noise=0.05):
    """The golden generation recipe (manifest.json), in float64, rounded to float32."""
    g = torch.Generator().manual_seed(seed)
    common = {}
    for key, shp in shapes.items():
        if len(shp) == 2:
            m, n = shp
            common[key] = scale * (torch.randn(m, rc, generator=g, dtype=torch.float64) @ torch.randn(rc, n, generator=g, dtype=torch.float64)) / rc ** 0.5
        else:
            common[key] = scale * torch.randn(*shp, generator=g, dtype=torch.float64)
    tvs = []
    for _ in range(T):
        d = {}
        for key, shp in shapes.items():
            if len(shp) == 2:
                m, n = shp
                a = torch.randn(m, r, generator=g, dtype=torch.float64); b = torch.randn(r, n, generator=g, dtype=torch.float64)
                nz = torch.randn(m, n, generator=g, dtype=torch.float64)
                d[key] = common[key] + scale * ((a @ b) / r ** 0.5 + noise * nz)
            else:
                d[key] = common[key] + scale * torch.randn(*shp, generator=g, dtype=torch.float64)
            d[key] = d[key].float().double()
        tvs.append(d)
    return tvs
