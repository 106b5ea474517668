"""The vtk ops: typed Python entry points, fake kernels, and backend registration.

Every function here calls ``torch.ops.vtk.<name>``, so the dispatcher picks the kernel for the
input's device (C++ on the CPU; CUDA C++ or Triton on the GPU; see ``_library``). The fake
kernels give ``torch.compile`` the output shapes without running anything.

Conventions (SPEC.md): batch first; scores are float32; index outputs are int64, ascending
(raster order) and unique; token outputs keep the input's dtype. Tie rule: equal scores rank the
lower position first; NaN ranks below every number, -0.0 equals +0.0.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _library
from . import _validate as V
from . import reference as ref

__all__ = ["cls_attention", "attention_received", "fopru_significance", "topk_indices",
           "gather_tokens", "fopru_select", "vispruner_select", "prumerge",
           "attention_received_varlen", "glimpse_logits", "gather_cache"]


def cls_attention(q: Tensor, k: Tensor, num_heads: int, scale: Optional[float] = None) -> Tensor:
    """CLS row of the attention, patch keys only, mean over heads.

    q, k: [B, T, C] (``q_proj``/``k_proj`` outputs, heads concatenated; token 0 is CLS), any
    float dtype, may be non-contiguous. Softmax over all T keys of ``scale * q_h . k_h``
    (``scale=None``: head_dim ** -0.5). Returns float32 [B, T - 1]. Reads one query row: no
    attention map is formed.
    """
    return torch.ops.vtk.cls_attention(q, k, num_heads, scale)


def attention_received(q: Tensor, k: Tensor, num_heads: int, scale: Optional[float] = None,
                       has_cls: bool = True) -> Tensor:
    """Attention each patch key receives, mean over heads and over patch queries.

    q, k: [B, T, C]; with ``has_cls`` token 0 is CLS and is excluded as a query and from the
    output (N = T - 1), but the softmax is over all T keys. Returns float32 [B, N].
    """
    return torch.ops.vtk.attention_received(q, k, num_heads, scale, has_cls)


def fopru_significance(q: Tensor, k: Tensor, num_heads: int, scale: Optional[float] = None,
                       has_cls: bool = True) -> Tensor:
    """FoPru significance: per image, the column means of the head-averaged patch attention if
    their population variance is at least that of the row means, else the row means.

    q, k: [B, T, C]. Returns float32 [B, N].
    """
    return torch.ops.vtk.fopru_significance(q, k, num_heads, scale, has_cls)


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """Positions of the k highest scores per row, ascending.

    scores: [B, N], any float dtype. 1 <= k <= N. Returns int64 [B, k]. Ties: lower position
    first; NaN ranks lowest. Bit-identical on CPU, Triton and CUDA.
    """
    return torch.ops.vtk.topk_indices(scores, k)


def gather_tokens(x: Tensor, indices: Tensor) -> Tensor:
    """Rows of x [B, N, D] at indices [B, k] (int64 or int32, in [0, N)), in that order: [B, k, D]."""
    return torch.ops.vtk.gather_tokens(x, indices)


def fopru_select(x: Tensor, scores: Tensor, keep: int, strategy: str = "rank",
                 grid_width: int = 0) -> Tuple[Tensor, Tensor]:
    """FoPru selection: (kept tokens [B, keep, D], indices int64 [B, keep] ascending).

    strategy "rank": the ``keep`` best tokens. "row": view scores as an H x W grid (W =
    ``grid_width``, 0 = square), take whole rows by row sum (float64, left to right), best
    first, then the best ``keep mod W`` tokens of the next row. Ties: lower position first.
    """
    return torch.ops.vtk.fopru_select(x, scores, keep, strategy, grid_width)


def vispruner_select(x: Tensor, scores: Tensor, keep: int, important_ratio: float = 0.5,
                     dedup_step: int = 8) -> Tensor:
    """VisPruner selection: indices int64 [B, keep], ascending.

    x: [B, N, C] features (any float dtype, may be non-contiguous); scores: [B, N] (CLS
    attention). T_imp = floor(keep * important_ratio) best tokens by score (ties: lower position
    first, NaN lowest), then keep - T_imp diverse tokens: repeated parity matching on the cosine
    similarity of the L2-normalised features, dropping up to ``dedup_step`` best-matched even
    entries per round (at most the even entries there are; ALGORITHMS.md). Similarities are
    float32 (float64 for float64 x); equal match scores keep the lower list position first.
    """
    return torch.ops.vtk.vispruner_select(x, scores, keep, important_ratio, dedup_step)


def prumerge(x: Tensor, keys: Tensor, scores: Tensor, knn: int = 32, plus: bool = False,
             per_sample: bool = True) -> Tuple[Tensor, Tensor]:
    """PruMerge / PruMerge+: (tokens [B, M, D] in x's dtype, zero-padded; lengths int64 [B]).

    x: [B, N, D] features; keys: [B, N, Ck] last-layer keys of the patches; scores: [B, N] raw
    CLS attention. Per image (``per_sample``; else pooled over the batch as published): k = the
    number of IQR upper outliers of the scores (numpy 'linear' quartiles, at least 1); kept =
    the k best in descending-score order (ties: lower position first), then with ``plus`` the
    spatial samples ascending. Each kept token becomes x_i + sum of s_j x_j over its ``knn``
    nearest other tokens by key cosine similarity (ties: lower position first); one summary
    token (sum of s_j x_j over the pruned tokens) follows. lengths[b] = kept + 1; M = max
    lengths (data-dependent: one device-to-host sync per call on CUDA). Sums in float32 (float64
    for float64 x).
    """
    return torch.ops.vtk.prumerge(x, keys, scores, knn, plus, per_sample)


def attention_received_varlen(q: Tensor, k: Tensor, cu_seqlens: Tensor, num_heads: int,
                              scale: Optional[float] = None) -> Tensor:
    """Attention each token receives from the queries of its own segment, over packed segments.

    q, k: [S, C] (heads concatenated; may be non-contiguous views, e.g. of a fused qkv), the
    images of a Qwen-VL tower packed along S; cu_seqlens: int32/int64 [n + 1], segment starts,
    0 first and S last, non-decreasing (empty segments allowed). Per segment, softmax over its own
    keys of ``scale * q_h . k_h``; per token, the mean over heads and over the segment's queries.
    Returns float32 [S]. On towers without CLS this is also FoPru's significance (the row means
    are all 1/n). No [H, S, S] map and no padding to the longest segment.
    """
    return torch.ops.vtk.attention_received_varlen(q, k, cu_seqlens, num_heads, scale)


def glimpse_logits(q: Tensor, k: Tensor, scale: Optional[float] = None, key_mask: Optional[Tensor] = None,
                   log_softmax: bool = False) -> Tensor:
    """GlimpsePrune's glimpse row: one query row per head against a KV cache's keys.

    q: [B, Hq, D]; k: [B, Hkv, L, D] (Hq a multiple of Hkv; query head h reads key head
    h // (Hq // Hkv)). Returns float32 [B, Hq, L]: ``q . k * scale`` (scale=None: D ** -0.5), or
    with ``log_softmax`` its log-softmax over the keys where ``key_mask`` [B, L] (bool) is true,
    -inf at masked keys (a row with every key masked is all -inf). key_mask only affects the
    log-softmax.
    """
    return torch.ops.vtk.glimpse_logits(q, k, scale, key_mask, log_softmax)


def gather_cache(tensors: List[Tensor], index: Tensor) -> List[Tensor]:
    """Gathers many tensors along the sequence in one launch (e.g. every layer's keys and values).

    tensors: [B, ..., L, D] each (sequence at dim -2, the same B and L; dtypes and middle dims may
    differ); index: int64 [B, M], values in [-1, L), any order, repeats allowed, -1 = a padding
    slot written as zeros. Returns [B, ..., M, D] per tensor, in its dtype.
    """
    return torch.ops.vtk.gather_cache(list(tensors), index)


# --- fake kernels (shapes only; data-independent checks run here too) ----------------------

def _fake_scores(q, k, num_heads, scale=None, has_cls=True):
    B, T, C, N = V.check_qk(q, k, num_heads, scale, has_cls)
    return q.new_empty((B, N), dtype=torch.float32)


def _fake_cls(q, k, num_heads, scale=None):
    return _fake_scores(q, k, num_heads, scale, True)


def _fake_topk(scores, k):
    B, N = V.check_scores(scores)
    V.check_count("k", k, N)
    return scores.new_empty((B, k), dtype=torch.int64)


def _fake_gather(x, indices):
    V.check_gather(x, indices)
    return x.new_empty((x.shape[0], indices.shape[1], x.shape[2]))


def _fake_fopru_select(x, scores, keep, strategy="rank", grid_width=0):
    B, N, D = V.check_fopru_select(x, scores, keep, strategy, grid_width)
    return x.new_empty((B, keep, D)), scores.new_empty((B, keep), dtype=torch.int64)


def _fake_vispruner_select(x, scores, keep, important_ratio=0.5, dedup_step=8):
    B, N, C = V.check_vispruner(x, scores, keep, important_ratio, dedup_step)
    return scores.new_empty((B, keep), dtype=torch.int64)


def _fake_prumerge(x, keys, scores, knn=32, plus=False, per_sample=True):
    B, N, D, Ck = V.check_prumerge(x, keys, scores, knn, plus, per_sample)
    M = torch.library.get_ctx().new_dynamic_size(min=2)  # kept tokens (>= 1) + the summary token
    return x.new_empty((B, M, D)), scores.new_empty((B,), dtype=torch.int64)


def _fake_varlen(q, k, cu_seqlens, num_heads, scale=None):
    S, C, n = V.check_varlen(q, k, cu_seqlens, num_heads, scale)
    return q.new_empty((S,), dtype=torch.float32)


def _fake_glimpse_logits(q, k, scale=None, key_mask=None, log_softmax=False):
    B, Hq, Hkv, L, D = V.check_glimpse(q, k, scale, key_mask)
    return q.new_empty((B, Hq, L), dtype=torch.float32)


def _fake_gather_cache(tensors, index):
    B, L, M = V.check_gather_cache(tensors, index)
    return [t.new_empty((*t.shape[:-2], M, t.shape[-1])) for t in tensors]


# --- CUDA kernels served from Python (imported lazily: importing vtkernels never imports triton)

def _triton(module: str, name: str):
    def kernel(*args):
        mod = __import__(f"vtkernels.triton.{module}", fromlist=[name])
        return getattr(mod, name)(*args)
    kernel.__name__ = f"triton_{name}"
    return kernel


_CPU = {n: getattr(ref, n) for n in __all__}
_CUDA = {
    "cls_attention": (_triton("scoring", "cls_attention"), ref.cls_attention),
    "attention_received": (_triton("scoring", "attention_received"), ref.attention_received),
    "fopru_significance": (_triton("scoring", "fopru_significance"), ref.fopru_significance),
    "topk_indices": (_triton("select", "topk_indices"), ref.topk_indices),
    "gather_tokens": (_triton("select", "gather_tokens"), ref.gather_tokens),
    "fopru_select": (_triton("select", "fopru_select"), ref.fopru_select),
    "vispruner_select": (_triton("prune", "vispruner_select"), ref.vispruner_select),
    "prumerge": (_triton("prune", "prumerge"), ref.prumerge),
    "attention_received_varlen": (_triton("varlen", "attention_received_varlen"), ref.attention_received_varlen),
    "glimpse_logits": (_triton("glimpse", "glimpse_logits"), ref.glimpse_logits),
    "gather_cache": (_triton("glimpse", "gather_cache"), ref.gather_cache),
}
_FAKES = {
    "cls_attention": _fake_cls,
    "attention_received": _fake_scores,
    "fopru_significance": _fake_scores,
    "topk_indices": _fake_topk,
    "gather_tokens": _fake_gather,
    "fopru_select": _fake_fopru_select,
    "vispruner_select": _fake_vispruner_select,
    "prumerge": _fake_prumerge,
    "attention_received_varlen": _fake_varlen,
    "glimpse_logits": _fake_glimpse_logits,
    "gather_cache": _fake_gather_cache,
}

_library.install(_CPU, _CUDA)
for _name, _fake in _FAKES.items():
    torch.library.register_fake(f"vtk::{_name}", _fake, lib=_library._libs[-1])
