"""Plain PyTorch reference implementations: the test oracle for every backend.

Written from ALGORITHMS.md for clarity, not speed: attention maps are materialised, ranking is
done with stable sorts. Float64 inputs are computed in float64 (the exactness mode the tests
use); everything else in float32. Scores come back as float32 (SPEC.md).

Ranking rule used everywhere (``rank_order``): higher score first; equal scores keep the lower
position first; NaN ranks below every number (below -inf); -0.0 equals +0.0.
"""
from __future__ import annotations

import torch

from . import _validate as V

__all__ = [
    "acc_dtype", "rank_order", "attention_probs", "cls_attention", "attention_received",
    "fopru_significance", "topk_indices", "gather_tokens", "fopru_row_indices", "fopru_select",
    "l2_normalize", "vispruner_similarity", "vispruner_counts", "vispruner_dedup", "vispruner_select", "iqr_upper_bound",
    "prumerge_counts", "prumerge_samples", "prumerge_similarity", "prumerge",
    "attention_received_varlen", "glimpse_logits", "gather_cache",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rank_order(scores: torch.Tensor) -> torch.Tensor:
    """Permutation [B, N] listing positions best first under the universal tie rule."""
    s = scores.to(torch.float64) + 0.0  # exact for every float dtype; -0.0 + 0.0 == +0.0
    nan = torch.isnan(s)
    s = torch.where(nan, torch.full_like(s, -float("inf")), s)
    # Two stable sorts = lexicographic order on (is NaN, -score, position).
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    nan_sorted = torch.gather(nan, 1, order).to(torch.int8)
    second = torch.sort(nan_sorted, dim=1, stable=True).indices
    return torch.gather(order, 1, second)


def attention_probs(q: torch.Tensor, k: torch.Tensor, num_heads: int, scale=None) -> torch.Tensor:
    """Full attention map [B, H, T, T] (softmax over all T keys)."""
    B, T, C = q.shape
    dh = C // num_heads
    if scale is None:
        scale = dh ** -0.5
    dt = acc_dtype(q.dtype)
    qh = q.to(dt).reshape(B, T, num_heads, dh).transpose(1, 2)
    kh = k.to(dt).reshape(B, T, num_heads, dh).transpose(1, 2)
    logits = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    return torch.softmax(logits, dim=-1)


def cls_attention(q, k, num_heads: int, scale=None) -> torch.Tensor:
    V.check_qk(q, k, num_heads, scale, has_cls=True)
    probs = attention_probs(q, k, num_heads, scale)
    return probs[:, :, 0, 1:].mean(dim=1).to(torch.float32)


def _patch_attention(q, k, num_heads, scale, has_cls):
    V.check_qk(q, k, num_heads, scale, has_cls=has_cls)
    a = attention_probs(q, k, num_heads, scale).mean(dim=1)  # [B, T, T], mean over heads
    return a[:, 1:, 1:] if has_cls else a


def attention_received(q, k, num_heads: int, scale=None, has_cls: bool = True) -> torch.Tensor:
    a = _patch_attention(q, k, num_heads, scale, has_cls)
    return a.mean(dim=1).to(torch.float32)  # column means: mean over patch queries


def fopru_significance(q, k, num_heads: int, scale=None, has_cls: bool = True) -> torch.Tensor:
    a = _patch_attention(q, k, num_heads, scale, has_cls)
    col = a.mean(dim=1)
    row = a.mean(dim=2)
    use_col = col.var(dim=1, unbiased=False) >= row.var(dim=1, unbiased=False)
    return torch.where(use_col[:, None], col, row).to(torch.float32)


def topk_indices(scores, k: int) -> torch.Tensor:
    B, N = V.check_scores(scores)
    V.check_count("k", k, N)
    return rank_order(scores)[:, :k].sort(dim=1).values


def gather_tokens(x, indices) -> torch.Tensor:
    V.check_gather(x, indices)
    V.check_gather_range(indices, x.shape[1])
    idx = indices.to(torch.int64)
    return torch.gather(x, 1, idx[:, :, None].expand(-1, -1, x.shape[2]))


def fopru_row_indices(scores, keep: int, grid_width: int = 0) -> torch.Tensor:
    """FoPru row strategy: whole grid rows, best first, then the best tokens of the next row."""
    B, N = scores.shape
    W = V.grid_width_of(N, grid_width)
    H = N // W
    s = scores.to(torch.float64).reshape(B, H, W)
    # Row sums in float64, left to right: every backend sums in this order, so the row
    # ranking is bit-identical across CPU, Triton and CUDA.
    rowsum = torch.zeros(B, H, dtype=torch.float64, device=scores.device)
    for w in range(W):
        rowsum = rowsum + s[:, :, w]
    row_order = rank_order(rowsum)
    full, rem = divmod(keep, W)
    cols = torch.arange(W, device=scores.device)
    picked = [(row_order[:, :full, None] * W + cols).reshape(B, full * W)]
    if rem:
        r = row_order[:, full]  # the next-best row
        within = rank_order(torch.gather(s, 1, r[:, None, None].expand(-1, 1, W))[:, 0])
        picked.append(r[:, None] * W + within[:, :rem])
    return torch.cat(picked, dim=1).sort(dim=1).values


def fopru_select(x, scores, keep: int, strategy: str = "rank", grid_width: int = 0):
    V.check_fopru_select(x, scores, keep, strategy, grid_width)
    if strategy == "rank":
        idx = topk_indices(scores, keep)
    else:
        idx = fopru_row_indices(scores, keep, grid_width)
    return gather_tokens(x, idx), idx


# --- VisPruner and PruMerge (issue 3) ---------------------------------------------------------

def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / max(||x||, 1e-12) along the last dim (F.normalize's rule: a zero row stays zero, no NaN)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# How the similarities are formed is part of the contract in float64: every backend (C++, Triton)
# forms them with exactly these ATen ops, on the same shapes and layouts (Triton calls these
# functions; the C++ kernel makes the same calls), so that the matrix products round identically
# and exact-tie inputs resolve the same way. BLAS rounds differently across shapes (blocking,
# fused multiply-adds: e.g. -2.2e-17 against an exact 0 for orthogonal rows), so a subset product
# or a per-image product can differ from the batched one in the last bit; what matters is that
# every backend forms the same one. A batched product is one BLAS call for the whole batch, and
# each image is its own matrix of it: its result does not depend on the rest of the batch
# (python_tests/test_prune.py checks that on every backend).

def vispruner_similarity(x: torch.Tensor) -> torch.Tensor:
    """VisPruner's cosine similarities: [B, N, N], one batched product xn @ xn^T
    (xn = l2_normalize(x) in the accumulation dtype). Entry [b, i, j] is tokens i, j of image b."""
    xn = l2_normalize(x.to(acc_dtype(x.dtype)))
    return torch.matmul(xn, xn.transpose(1, 2))


def prumerge_similarity(kn_b: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """PruMerge's key similarities of one image: [K, N], row t = the kept token kept[t] against
    every token. kn_b: [N, Ck] L2-normalised keys (l2_normalize of keys in the accumulation
    dtype); kept: int64 [K] positions. One product per image (the kept counts differ per image)."""
    return kn_b[kept] @ kn_b.T


def vispruner_counts(keep: int, important_ratio: float) -> tuple[int, int]:
    """(T_imp, T_div): floor(keep * ratio) in float64, as the published int(T * r)."""
    n_imp = int(keep * important_ratio)
    return n_imp, keep - n_imp


def vispruner_dedup(sim: torch.Tensor, residual: list, n_div: int, dedup_step: int = 8) -> list:
    """VisPruner's duplicate removal on one image.

    sim: [*, *] cosine similarities indexed by the entries of `residual` (the residual list, best
    score first). Returns the final list (length n_div). NaN similarities count as -inf (cosines
    of finite vectors are never -inf, so this is just "NaN lowest").

    Reading of ALGORITHMS.md, step 4, as the published code does it: the a-entries are scored by
    their highest similarity to any b-entry; the kept a-entries go to the front of the new list in
    descending order of THAT match score (the published `scores.argsort(descending=True)[:, r:]`),
    not of the attention score. Equal match scores keep the lower list position first (a stable
    argsort of the published code).
    """
    sim = torch.where(torch.isnan(sim), torch.full_like(sim, -float("inf")), sim)
    residual = torch.as_tensor(residual, dtype=torch.int64, device=sim.device)
    while n_div > 0:
        R = residual.numel()
        r = min(dedup_step, R - n_div)
        if r <= 0:
            break
        a, b = residual[0::2], residual[1::2]
        match = sim[a[:, None], b[None, :]].max(dim=1).values
        ranked = rank_order(match[None])[0]
        drop = min(r, a.numel())  # (fix) with an odd R, a is one longer than b; never drop more than a
        residual = torch.cat([a[ranked[drop:]], b])
    return residual.tolist()


def vispruner_select(x, scores, keep: int, important_ratio: float = 0.5, dedup_step: int = 8) -> torch.Tensor:
    V.check_vispruner(x, scores, keep, important_ratio, dedup_step)
    B, N, C = x.shape
    n_imp, n_div = vispruner_counts(keep, important_ratio)
    order = rank_order(scores)
    sims = vispruner_similarity(x) if n_div > 0 else None  # the similarities, once per image
    out = []
    for b in range(B):
        important = order[b, :n_imp].tolist()
        selected = important
        if n_div > 0:
            residual = order[b, n_imp:].tolist()
            selected = important + vispruner_dedup(sims[b], residual, n_div, dedup_step)
        out.append(sorted(selected))
    if B == 0:
        return torch.empty((0, keep), dtype=torch.int64, device=scores.device)
    return torch.tensor(out, dtype=torch.int64, device=scores.device).reshape(B, keep)


def iqr_upper_bound(s: torch.Tensor) -> torch.Tensor:
    """Q3 + 1.5 (Q3 - Q1) of a 1-D tensor, in its dtype; NaN if s holds a NaN (as numpy).

    Quartiles as numpy.percentile's default ('linear'): virtual index (n - 1) q, then numpy's lerp,
    a + (b - a) t for t < 0.5 and b - (b - a)(1 - t) otherwise. (n - 1) q is exact for q = 1/4, 3/4.
    """
    if torch.isnan(s).any():
        return s.new_tensor(float("nan"))
    v = s.sort().values
    n = v.numel()

    def percentile(q):
        h = (n - 1) * q
        lo = int(h)
        t = h - lo
        a, b = v[lo], v[min(lo + 1, n - 1)]
        d = b - a
        return a + d * t if t < 0.5 else b - d * (1 - t)

    q1, q3 = percentile(0.25), percentile(0.75)
    return q3 + 1.5 * (q3 - q1)


def prumerge_counts(scores, per_sample: bool = True) -> list:
    """PruMerge's adaptive count per image: the IQR upper outliers, at least 1 (fix).

    Quartiles in the scores' precision (float64 for float64, else float32). per_sample=False pools
    the whole batch, as the published code: count = int(N * n_outliers / (B N)), taken here as the
    exact integer n_outliers // B.
    """
    s = scores.to(acc_dtype(scores.dtype))
    B, N = s.shape
    if B == 0:
        return []
    if per_sample:
        counts = [int((s[b] > iqr_upper_bound(s[b])).sum()) for b in range(B)]
    else:
        counts = [int((s > iqr_upper_bound(s.flatten())).sum()) // B] * B
    return [max(1, c) for c in counts]


def prumerge_samples(N: int, count: int, kept: list) -> list:
    """PruMerge+ spatial samples: every stride-th position below N - 1 that is not kept, ascending."""
    stride = max(1, (N // count) // 3)  # (fix) the max: a large count gave stride 0
    taken = set(kept)
    return [p for p in range(0, N - 1, stride) if p not in taken]


def prumerge(x, keys, scores, knn: int = 32, plus: bool = False, per_sample: bool = True):
    B, N, D, Ck = V.check_prumerge(x, keys, scores, knn, plus, per_sample)
    dt = acc_dtype(x.dtype)
    kn = l2_normalize(keys.to(acc_dtype(keys.dtype)))
    order = rank_order(scores)
    counts = prumerge_counts(scores, per_sample)
    rows, lengths = [], []
    for b in range(B):
        kept = order[b, :counts[b]].tolist()  # descending score: the published order
        if plus:
            kept = kept + prumerge_samples(N, counts[b], kept)
        xb = x[b].to(dt)
        wb = scores[b].to(dt)
        merged = []
        every = torch.arange(N, device=x.device)
        sims = prumerge_similarity(kn[b], torch.tensor(kept, dtype=torch.int64, device=x.device))
        for t, i in enumerate(kept):
            cand = torch.cat([every[:i], every[i + 1:]])  # every other token, ascending
            sim = sims[t, cand]
            sim = torch.where(torch.isnan(sim), torch.full_like(sim, -float("inf")), sim)
            near = cand[rank_order(sim[None])[0, :knn]]  # fewer than knn candidates: all of them
            merged.append(xb[i] + (wb[near, None] * xb[near]).sum(dim=0))
        pruned = torch.ones(N, dtype=torch.bool, device=x.device)
        pruned[kept] = False
        summary = wb[pruned] @ xb[pruned]  # one matrix-vector product over the pruned tokens
        rows.append(torch.stack(merged + [summary]))
        lengths.append(len(kept) + 1)
    M = max(lengths, default=2)  # B = 0: the fake kernel's minimum (a kept token + the summary)
    out = x.new_zeros((B, M, D))
    for b in range(B):
        out[b, :lengths[b]] = rows[b].to(x.dtype)
    return out, torch.tensor(lengths, dtype=torch.int64, device=x.device)


# --- towers without CLS (issue 8) ---------------------------------------------------------------

def attention_received_varlen(q, k, cu_seqlens, num_heads: int, scale=None) -> torch.Tensor:
    """Attention each token receives within its own segment, mean over heads and the segment's
    queries: [S] float32. q, k: [S, C] packed segments (images) delimited by cu_seqlens [n + 1].
    Every row of a segment's attention sums to 1 over that segment's keys, so a segment of n
    tokens has scores summing to 1 (and a segment of one token scores 1)."""
    S, C, n = V.check_varlen(q, k, cu_seqlens, num_heads, scale)
    V.check_cu_seqlens_values(cu_seqlens, S)
    out = torch.zeros(S, dtype=torch.float32, device=q.device)
    cu = cu_seqlens.tolist()
    for s0, s1 in zip(cu, cu[1:]):
        if s1 > s0:
            probs = attention_probs(q[None, s0:s1], k[None, s0:s1], num_heads, scale)  # [1, H, n, n]
            out[s0:s1] = probs[0].mean(dim=0).mean(dim=0).to(torch.float32)
    return out


# --- GlimpsePrune (issue 9) ---------------------------------------------------------------------

def glimpse_logits(q, k, scale=None, key_mask=None, log_softmax: bool = False) -> torch.Tensor:
    """One query row per head against a KV cache's keys: [B, Hq, L] float32.

    q: [B, Hq, D]; k: [B, Hkv, L, D], query head h reads key head h // (Hq // Hkv) (GQA).
    Logits q.k * scale (scale=None: D ** -0.5); with log_softmax, the log-softmax over the keys
    where key_mask [B, L] is true (all keys without a mask), -inf elsewhere; a row with no key
    unmasked is all -inf."""
    B, Hq, Hkv, L, D = V.check_glimpse(q, k, scale, key_mask)
    if scale is None:
        scale = D ** -0.5
    dt = acc_dtype(q.dtype)
    kk = k.to(dt).repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq, L, D]
    logits = torch.einsum("bhd,bhld->bhl", q.to(dt), kk) * scale
    if log_softmax:
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask[:, None, :], -float("inf"))
        m = logits.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        lse = (logits - m).exp().sum(dim=-1, keepdim=True).log() + m
        logits = logits - lse
        if key_mask is not None:  # (-inf) - (-inf) is NaN in a fully masked row: keep it -inf
            logits = logits.masked_fill(~key_mask[:, None, :], -float("inf"))
    return logits.to(torch.float32)


def gather_cache(tensors, index) -> list:
    """Every tensor [B, ..., L, D] gathered along dim -2 at index [B, M] (int64, values in
    [-1, L); any order, repeats allowed; -1 = a padding slot, written as zeros): [B, ..., M, D]."""
    B, L, M = V.check_gather_cache(tensors, index)
    V.check_gather_cache_range(index, L)
    if L == 0:  # every slot is padding (index all -1); torch.gather cannot read a length-0 dim
        return [t.new_zeros((*t.shape[:-2], M, t.shape[-1])) for t in tensors]
    pad = index < 0
    safe = index.clamp_min(0)
    out = []
    for t in tensors:
        # A gather moves bits: done on an integer view of the same width, so every float format
        # works (torch.gather has no float8 kernel) and NaN payloads survive.
        bits = t.view(_BITS[t.element_size()])
        mid = t.shape[1:-2]
        idx = safe.reshape(B, *([1] * len(mid)), M, 1).expand(B, *mid, M, t.shape[-1])
        g = torch.gather(bits, t.dim() - 2, idx)
        keep = (~pad).reshape(B, *([1] * len(mid)), M, 1)
        out.append(torch.where(keep, g, torch.zeros((), dtype=g.dtype, device=t.device)).view(t.dtype))
    return out


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
