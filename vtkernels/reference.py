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
