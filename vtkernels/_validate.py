"""Argument checks shared by the reference kernels, the Triton launchers and the fake kernels.

The C++ kernels carry the same checks (csrc/cpu/checks.h) with the same messages, so every
backend rejects bad input the same way: ValueError naming the argument.
"""
from __future__ import annotations

import math

import torch


def _float_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _same_device(**tensors) -> None:
    devices = {n: t.device for n, t in tensors.items()}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device: {desc}")


def _check_qk_pair(q, k, dims: int, layout: str, num_heads: int, scale) -> None:
    """What every scoring op checks of q and k: float tensors of the same device, shape and dtype,
    ``dims``-D (``layout`` names the dims for messages), the heads dividing the channels, a
    finite scale. (The devices are checked by the caller, with the op's other tensors.)"""
    _float_tensor("q", q)
    _float_tensor("k", k)
    if q.dim() != dims:
        raise ValueError(f"q must be {layout}, got shape {tuple(q.shape)}")
    if k.dim() != dims:
        raise ValueError(f"k must be {layout}, got shape {tuple(k.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if q.dtype != k.dtype:
        raise ValueError(f"q and k must have the same dtype, got q {q.dtype} and k {k.dtype}")
    C = q.shape[-1]
    if num_heads < 1 or C % num_heads != 0:
        raise ValueError(f"num_heads={num_heads} must be >= 1 and divide the channel count C={C}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")


def check_qk(q, k, num_heads: int, scale, has_cls: bool = True) -> tuple[int, int, int, int]:
    """Checks q/k for the scoring ops; returns (B, T, C, N)."""
    _float_tensor("q", q)
    _float_tensor("k", k)
    _same_device(q=q, k=k)
    _check_qk_pair(q, k, 3, "[B, T, C]", num_heads, scale)
    B, T, C = q.shape
    N = T - 1 if has_cls else T
    if N < 1:
        raise ValueError(f"q/k need at least one patch token, got T={T} (has_cls={has_cls})")
    return B, T, C, N


def check_scores(scores, name: str = "scores") -> tuple[int, int]:
    _float_tensor(name, scores)
    if scores.dim() != 2:
        raise ValueError(f"{name} must be [B, N], got shape {tuple(scores.shape)}")
    B, N = scores.shape
    if N < 1:
        raise ValueError(f"{name} must have at least one token, got N={N}")
    return B, N


def check_count(name: str, value: int, N: int) -> None:
    if not 1 <= value <= N:
        raise ValueError(f"{name}={value} must be in [1, N] with N={N}")


def check_tokens(x, B: int, N: int, name: str = "x") -> int:
    _float_tensor(name, x)
    if x.dim() != 3:
        raise ValueError(f"{name} must be [B, N, D], got shape {tuple(x.shape)}")
    if x.shape[0] != B:
        raise ValueError(f"{name} has batch {x.shape[0]}, expected {B}")
    if x.shape[1] != N:
        raise ValueError(f"{name} has {x.shape[1]} tokens, expected N={N}")
    return x.shape[2]


def check_gather(x, indices) -> None:
    _float_tensor("x", x)
    if not isinstance(indices, torch.Tensor):
        raise ValueError(f"indices must be a tensor, got {type(indices).__name__}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"indices must be int64 or int32, got {indices.dtype}")
    _same_device(x=x, indices=indices)
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, D], got shape {tuple(x.shape)}")
    if indices.dim() != 2:
        raise ValueError(f"indices must be [B, k], got shape {tuple(indices.shape)}")
    if indices.shape[0] != x.shape[0]:
        raise ValueError(f"indices has batch {indices.shape[0]}, x has batch {x.shape[0]}")


def check_gather_range(indices, N: int) -> None:
    """Data-dependent part of check_gather; skipped by the fake kernel.

    On CUDA it waits for the device once (both extremes in one copy), and not at all while the
    current stream is being captured into a CUDA graph, where a wait is an error (inside a graph
    the range is the kernel's to handle: the CUDA C++ gather writes a zero row for such an index).
    """
    if not indices.numel():
        return
    if indices.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    lo, hi = torch.stack(torch.aminmax(indices)).tolist()
    if lo < 0 or hi >= N:
        raise ValueError(f"indices must lie in [0, N) with N={N}, got values in [{lo}, {hi}]")


def grid_width_of(N: int, grid_width: int) -> int:
    """Width of the token grid for FoPru's row strategy (0 = square grid)."""
    if grid_width < 0:
        raise ValueError(f"grid_width must be >= 0, got {grid_width}")
    if grid_width == 0:
        w = math.isqrt(N)
        if w * w != N:
            raise ValueError(f"grid_width=0 means a square grid, but N={N} is not a square; pass grid_width")
        return w
    if N % grid_width != 0:
        raise ValueError(f"grid_width={grid_width} must divide N={N}")
    return grid_width


def check_fopru_select(x, scores, keep: int, strategy: str, grid_width: int) -> tuple[int, int, int]:
    B, N = check_scores(scores)
    D = check_tokens(x, B, N)
    _same_device(x=x, scores=scores)
    check_count("keep", keep, N)
    if strategy not in ("rank", "row"):
        raise ValueError(f"strategy must be 'rank' or 'row', got {strategy!r}")
    if strategy == "row":
        grid_width_of(N, grid_width)
    elif grid_width < 0:
        raise ValueError(f"grid_width must be >= 0, got {grid_width}")
    return B, N, D


def check_vispruner(x, scores, keep: int, important_ratio: float, dedup_step: int) -> tuple[int, int, int]:
    B, N = check_scores(scores)
    C = check_tokens(x, B, N)
    _same_device(x=x, scores=scores)
    check_count("keep", keep, N)
    if not 0.0 <= important_ratio <= 1.0:  # NaN fails too
        raise ValueError(f"important_ratio must be in [0, 1], got {important_ratio}")
    if dedup_step < 1:
        raise ValueError(f"dedup_step must be >= 1, got {dedup_step}")
    return B, N, C


def check_prumerge(x, keys, scores, knn: int, plus: bool, per_sample: bool) -> tuple[int, int, int, int]:
    B, N = check_scores(scores)
    D = check_tokens(x, B, N)
    Ck = check_tokens(keys, B, N, name="keys")
    _same_device(x=x, keys=keys, scores=scores)
    if knn < 1:
        raise ValueError(f"knn must be >= 1, got {knn}")
    return B, N, D, Ck


# --- towers without CLS and GlimpsePrune (issues 8, 9) -----------------------------------------

def check_varlen(q, k, cu_seqlens, num_heads: int, scale) -> tuple[int, int, int]:
    """Checks of attention_received_varlen that need no data; returns (S, C, n segments)."""
    _float_tensor("q", q)
    _float_tensor("k", k)
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens must be a tensor, got {type(cu_seqlens).__name__}")
    _same_device(q=q, k=k, cu_seqlens=cu_seqlens)
    _check_qk_pair(q, k, 2, "[S, C]", num_heads, scale)
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be [n + 1] (1-D, at least one entry), got shape {tuple(cu_seqlens.shape)}")
    S, C = q.shape
    return S, C, cu_seqlens.numel() - 1


def check_cu_seqlens_values(cu_seqlens, S: int) -> None:
    """Data-dependent part of check_varlen (syncs on CUDA; skipped by the fake kernel)."""
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != S or any(b < a for a, b in zip(cu, cu[1:])):
        shown = cu if len(cu) <= 8 else cu[:4] + ["..."] + cu[-3:]
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at S={S}, got {shown}")


def check_glimpse(q, k, scale, key_mask) -> tuple[int, int, int, int, int]:
    """Checks of glimpse_logits; returns (B, Hq, Hkv, L, D)."""
    _float_tensor("q", q)
    _float_tensor("k", k)
    _same_device(q=q, k=k)
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D] (one query row per head), got shape {tuple(q.shape)}")
    if k.dim() != 4:
        raise ValueError(f"k must be [B, Hkv, L, D] (a KV cache's keys), got shape {tuple(k.shape)}")
    if q.dtype != k.dtype:
        raise ValueError(f"q and k must have the same dtype, got q {q.dtype} and k {k.dtype}")
    B, Hq, D = q.shape
    Bk, Hkv, L, Dk = k.shape
    if Bk != B:
        raise ValueError(f"k has batch {Bk}, q has batch {B}")
    if Dk != D:
        raise ValueError(f"k has head_dim {Dk}, q has head_dim {D}")
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"q's {Hq} heads must be a multiple of k's {Hkv} heads (GQA)")
    if D < 1:
        raise ValueError(f"head_dim must be >= 1, got {D}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor):
            raise ValueError(f"key_mask must be a tensor, got {type(key_mask).__name__}")
        _same_device(q=q, key_mask=key_mask)
        if key_mask.dtype != torch.bool:
            raise ValueError(f"key_mask must be bool, got {key_mask.dtype}")
        if tuple(key_mask.shape) != (B, L):
            raise ValueError(f"key_mask must be [B, L] = [{B}, {L}], got shape {tuple(key_mask.shape)}")
    return B, Hq, Hkv, L, D


def check_gather_cache(tensors, index) -> tuple[int, int, int]:
    """Checks of gather_cache that need no data; returns (B, L, M)."""
    if not isinstance(tensors, (list, tuple)) or len(tensors) == 0:
        raise ValueError("tensors must be a non-empty list of tensors")
    if not isinstance(index, torch.Tensor):
        raise ValueError(f"index must be a tensor, got {type(index).__name__}")
    if index.dtype != torch.int64:
        raise ValueError(f"index must be int64, got {index.dtype}")
    if index.dim() != 2:
        raise ValueError(f"index must be [B, M], got shape {tuple(index.shape)}")
    B, M = index.shape
    L = None
    for i, t in enumerate(tensors):
        name = f"tensors[{i}]"
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != index.device:
            raise ValueError(f"tensors must be on one device: {name} on {t.device}, index on {index.device}")
        if t.dim() < 3:
            raise ValueError(f"{name} must be [B, ..., L, D], got shape {tuple(t.shape)}")
        if t.shape[0] != B:
            raise ValueError(f"{name} has batch {t.shape[0]}, index has batch {B}")
        if L is None:
            L = t.shape[-2]
        elif t.shape[-2] != L:
            raise ValueError(f"{name} has sequence length {t.shape[-2]}, tensors[0] has {L}")
    return B, L, M


def check_gather_cache_range(index, L: int) -> None:
    """Data-dependent part of check_gather_cache (one host wait on CUDA; skipped by the fake)."""
    if index.numel():
        lo, hi = torch.stack(torch.aminmax(index)).tolist()  # both extremes in one device-to-host copy
        if lo < -1 or hi >= L:
            raise ValueError(f"index must lie in [-1, L) with L={L} (-1 = padding), got values in [{lo}, {hi}]")
