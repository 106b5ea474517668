"""Triton kernels for the attention scores: cls_attention, attention_received, fopru_significance.

Notation: q, k are [B, T, C] with H heads of Dh = C / H channels (head h owns channels
h*Dh .. h*Dh + Dh - 1); s = scale (head_dim ** -0.5 unless given). Per head the attention is

    P_h[i, j] = exp(S_h[i, j] - m_h[i]) / l_h[i],   S_h[i, j] = s * sum_d q[i, h, d] k[j, h, d],
    m_h[i] = max_j S_h[i, j],                        l_h[i] = sum_j exp(S_h[i, j] - m_h[i]),

with the softmax over all T keys (CLS included). With ``has_cls`` token 0 is CLS and the patch
tokens are 1..T-1 (N = T - 1); without it every token is a patch (N = T). The ops return

    cls_attention[j]      = 1/H sum_h P_h[0, j]                             (patch keys j)
    attention_received[j] = 1/(H N) sum_h sum_{i patch} P_h[i, j]           (column means)
    row[i]                = 1/(H N) sum_h sum_{j patch} P_h[i, j]           (row means)
    fopru_significance    = column means if Var(col) >= Var(row) else row   (per image,
                                                                             population var)

No [B, H, T, T] buffer is ever formed: cls_attention keeps [B, H, T] logits of the single CLS
query; the other two use flash-style tiles and keep only per-query-block column partial sums
[B, H, T/BLOCK_M, N] and per-head row sums [B, H, N]. Every reduction runs in a fixed order (no
atomics), so results are run-to-run deterministic. Accumulation is float32, or float64 for
float64 inputs; outputs are float32.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import _validate as V

__all__ = ["cls_attention", "attention_received", "fopru_significance"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _scale_tensor(scale, head_dim: int, acc: torch.dtype, device) -> torch.Tensor:
    # A Python float kernel argument would arrive as float32; a one-element tensor carries the
    # scale in the accumulation dtype, rounded exactly as the reference's `logits * scale`.
    value = head_dim ** -0.5 if scale is None else float(scale)
    return torch.full((1,), value, dtype=acc, device=device)


def _block_d(head_dim: int) -> int:
    # tl.dot needs every tile dimension >= 16; the padding channels are masked to zero.
    return max(16, triton.next_power_of_2(head_dim))


@triton.jit
def _widen(x, ACC: tl.constexpr):
    """x in the accumulation dtype, exactly. bfloat16 goes through its bits (bits << 16 is the
    float32 pattern): the interpreter's own bfloat16 conversion mangles subnormals."""
    if x.dtype.is_bf16():
        y = (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
        y = y.to(ACC)
    else:
        y = x.to(ACC)
    return y


# --- cls_attention -------------------------------------------------------------------------

@triton.jit
def _cls_logits_kernel(
    q_ptr, q_sb, q_sc,
    k_ptr, k_sb, k_st, k_sc,
    scale_ptr,
    lg_ptr,
    T, H, DH,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Logits of the CLS query against one block of keys, every head.

    lg[b, h, j] = s * sum_d q[b, 0, h*Dh + d] * k[b, j, h*Dh + d]   for j in this block.
    Grid (B, cdiv(T, BLOCK_T)): k is read once in total.
    """
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    d = tl.arange(0, BLOCK_D)
    dmask = d < DH
    scale = tl.load(scale_ptr)
    for h in range(H):
        c = h * DH + d
        qv = _widen(tl.load(q_ptr + b * q_sb + c * q_sc, mask=dmask, other=0.0), ACC)
        kv = _widen(tl.load(k_ptr + b * k_sb + t[:, None].to(tl.int64) * k_st + c[None, :] * k_sc,
                            mask=tmask[:, None] & dmask[None, :], other=0.0), ACC)
        logit = tl.sum(kv * qv[None, :], axis=1) * scale
        tl.store(lg_ptr + (b * H + h) * T + t, logit, mask=tmask)


@triton.jit
def _cls_softmax_kernel(
    lg_ptr,
    out_ptr,
    T, H, N,
    ACC: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Per image: softmax over T of each head's CLS logits, mean over heads, patch keys out.

    Pass 1 (online): m_h = max_j lg[h, j], l_h = sum_j exp(lg[h, j] - m_h), rescaling l by
    exp(m_old - m_new) whenever the running max grows, so any T works in fixed-size blocks.
    Pass 2: out[j - 1] = 1/H sum_h exp(lg[h, j] - m_h) / l_h for j = 1..T-1.
    All heads are one [BLOCK_H, BLOCK_T] tile; the head sum is a fixed-order tl.sum.
    """
    b = tl.program_id(0).to(tl.int64)
    hh = tl.arange(0, BLOCK_H)
    hmask = hh < H
    rows = lg_ptr + (b * H + hh[:, None]) * T
    m = tl.full([BLOCK_H], float("-inf"), ACC)
    l = tl.zeros([BLOCK_H], ACC)
    for start in range(0, T, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        tmask = t < T
        # Padding heads read zeros (a finite max keeps exp() free of inf - inf); padding keys
        # read -inf (exp -> 0).
        x = tl.load(rows + t[None, :], mask=hmask[:, None] & tmask[None, :], other=0.0)
        x = tl.where(tmask[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    inv_l = 1.0 / l
    for start in range(0, T, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        tmask = t < T
        x = tl.load(rows + t[None, :], mask=hmask[:, None] & tmask[None, :], other=0.0)
        x = tl.where(tmask[None, :], x, float("-inf"))
        p = tl.exp(x - m[:, None]) * inv_l[:, None]
        p = tl.where(hmask[:, None], p, 0.0)
        mean = tl.sum(p, axis=0) / H
        tl.store(out_ptr + b * N + (t - 1), mean.to(tl.float32), mask=tmask & (t >= 1))


def cls_attention(q, k, num_heads: int, scale=None) -> torch.Tensor:
    """CLS row of the attention, patch keys only, mean over heads: float32 [B, T - 1]."""
    B, T, C, N = V.check_qk(q, k, num_heads, scale, has_cls=True)
    H = int(num_heads)
    DH = C // H
    acc = _acc_dtype(q.dtype)
    out = torch.empty((B, N), dtype=torch.float32, device=q.device)
    if B == 0:
        return out
    scale_t = _scale_tensor(scale, DH, acc, q.device)
    logits = torch.empty((B, H, T), dtype=acc, device=q.device)
    BLOCK_D = _block_d(DH)
    if _interpreting():
        block_t = min(256, triton.next_power_of_2(T))
    else:
        # Keep the [BLOCK_T, BLOCK_D] key tile around 8K elements.
        block_t = max(16, min(128, 8192 // BLOCK_D, triton.next_power_of_2(T)))
    _cls_logits_kernel[(B, triton.cdiv(T, block_t))](
        q, q.stride(0), q.stride(2),
        k, k.stride(0), k.stride(1), k.stride(2),
        scale_t, logits, T, H, DH,
        ACC=_tl_acc(q.dtype), BLOCK_T=block_t, BLOCK_D=BLOCK_D,
    )
    BLOCK_H = triton.next_power_of_2(H)
    block_t2 = max(16, min(triton.next_power_of_2(T), max(16, 4096 // BLOCK_H)))
    _cls_softmax_kernel[(B,)](
        logits, out, T, H, N,
        ACC=_tl_acc(q.dtype), BLOCK_H=BLOCK_H, BLOCK_T=block_t2,
    )
    return out


# --- attention_received / fopru_significance -----------------------------------------------

@triton.jit
def _patch_attention_kernel(
    q_ptr, q_sb, q_st, q_sc,
    k_ptr, k_sb, k_st, k_sc,
    scale_ptr,
    colp_ptr,
    rowp_ptr,
    T, N, H, DH, NQB,
    OFF: tl.constexpr, WITH_ROWS: tl.constexpr, ACC: tl.constexpr, WIDEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Column (and row) sums of one head's attention over one block of query rows.

    Program (b*H + h, qb) owns query rows i in [qb*BLOCK_M, (qb+1)*BLOCK_M).
    Pass 1 over key blocks: S = s * Q K^T (tl.dot on [BLOCK_M, BLOCK_D] x [BLOCK_D, BLOCK_N]
    tiles), online m[i] = max_j S[i, j] and l[i] = sum_j exp(S[i, j] - m[i]).
    Pass 2 recomputes S and P = exp(S - m) / l, then, over patch rows i and patch columns j
    (i, j >= OFF, < T):
        colp[b, h, qb, j - OFF] = sum_{i in block} P[i, j]
        rowp[b, h, i - OFF]     = sum_{j}          P[i, j]        (WITH_ROWS only)
    The host sums colp over qb and h (fixed order) and divides by H*N.
    WIDEN (set by the launcher under the interpreter, for float16/bfloat16 inputs) converts the
    q and k tiles to ACC before tl.dot: the interpreter's dot multiplies bfloat16 tiles as their
    uint16 storage. On a GPU the tiles stay 16-bit (tensor cores, ACC accumulation).
    """
    bh = tl.program_id(0)
    qb = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dmask = d < DH
    c = h * DH + d
    q = tl.load(q_ptr + b * q_sb + rows[:, None].to(tl.int64) * q_st + c[None, :] * q_sc,
                mask=(rows < T)[:, None] & dmask[None, :], other=0.0)
    if WIDEN:
        q = _widen(q, ACC)
    scale = tl.load(scale_ptr)
    k_base = k_ptr + b * k_sb + c[:, None] * k_sc

    m = tl.full([BLOCK_M], float("-inf"), ACC)
    l = tl.zeros([BLOCK_M], ACC)
    for start in range(0, T, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        kt = tl.load(k_base + cols[None, :].to(tl.int64) * k_st,
                     mask=dmask[:, None] & (cols < T)[None, :], other=0.0)
        if WIDEN:
            kt = _widen(kt, ACC)
        # "ieee": float32 inputs must not drop to TF32 (the reference is full float32).
        s = tl.dot(q, kt, input_precision="ieee", out_dtype=ACC) * scale
        s = tl.where((cols < T)[None, :], s, float("-inf"))
        # Key block 0 always holds a real key, so m is finite from the first block on and
        # exp(m_old - m_new) never sees inf - inf.
        m_new = tl.maximum(m, tl.max(s, axis=1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m = m_new

    inv_l = 1.0 / l
    row_patch = (rows >= OFF) & (rows < T)
    row_acc = tl.zeros([BLOCK_M], ACC)
    colp_row = colp_ptr + ((b * H + h) * NQB + qb) * N
    for start in range(0, T, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        kt = tl.load(k_base + cols[None, :].to(tl.int64) * k_st,
                     mask=dmask[:, None] & (cols < T)[None, :], other=0.0)
        if WIDEN:
            kt = _widen(kt, ACC)
        s = tl.dot(q, kt, input_precision="ieee", out_dtype=ACC) * scale
        col_patch = (cols >= OFF) & (cols < T)
        p = tl.exp(s - m[:, None]) * inv_l[:, None]
        p = tl.where(row_patch[:, None] & col_patch[None, :], p, 0.0)
        tl.store(colp_row + (cols - OFF), tl.sum(p, axis=0), mask=col_patch)
        if WITH_ROWS:
            row_acc += tl.sum(p, axis=1)
    if WITH_ROWS:
        tl.store(rowp_ptr + (b * H + h) * N + (rows - OFF), row_acc, mask=row_patch)


def _patch_sums(q, k, num_heads, scale, has_cls, with_rows):
    """(col, row) in the accumulation dtype, [B, N] each (row is None unless with_rows)."""
    B, T, C, N = V.check_qk(q, k, num_heads, scale, has_cls=has_cls)
    H = int(num_heads)
    DH = C // H
    acc = _acc_dtype(q.dtype)
    if B == 0:
        empty = torch.empty((0, N), dtype=acc, device=q.device)
        return empty, (empty if with_rows else None)
    BLOCK_D = _block_d(DH)
    tp = max(16, triton.next_power_of_2(T))
    if _interpreting():
        block_m = block_n = min(128, tp)
        num_warps = 4
    elif q.dtype == torch.float64:
        block_m, block_n, num_warps = min(32, tp), min(32, tp), 4
    elif q.dtype == torch.float32:
        block_m, block_n, num_warps = min(64, tp), min(32, tp), 4
    else:
        block_m, block_n, num_warps = min(64, tp), min(64, tp), 4
    nqb = triton.cdiv(T, block_m)
    scale_t = _scale_tensor(scale, DH, acc, q.device)
    colp = torch.empty((B, H, nqb, N), dtype=acc, device=q.device)
    rowp = torch.empty((B, H, N), dtype=acc, device=q.device) if with_rows else colp
    _patch_attention_kernel[(B * H, nqb)](
        q, q.stride(0), q.stride(1), q.stride(2),
        k, k.stride(0), k.stride(1), k.stride(2),
        scale_t, colp, rowp, T, N, H, DH, nqb,
        OFF=1 if has_cls else 0, WITH_ROWS=bool(with_rows), ACC=_tl_acc(q.dtype),
        WIDEN=_interpreting() and q.dtype != acc,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=BLOCK_D, num_warps=num_warps,
    )
    # Small [B, H, nqb, N] -> [B, N] reductions: torch's (non-atomic) sums are deterministic.
    col = colp.sum(dim=2).sum(dim=1) / (H * N)
    row = rowp.sum(dim=1) / (H * N) if with_rows else None
    return col, row


def attention_received(q, k, num_heads: int, scale=None, has_cls: bool = True) -> torch.Tensor:
    """Attention each patch key receives, mean over heads and patch queries: float32 [B, N]."""
    col, _ = _patch_sums(q, k, num_heads, scale, has_cls, with_rows=False)
    return col.to(torch.float32)


def fopru_significance(q, k, num_heads: int, scale=None, has_cls: bool = True) -> torch.Tensor:
    """FoPru significance: column means if Var(col) >= Var(row) (population), else row means."""
    col, row = _patch_sums(q, k, num_heads, scale, has_cls, with_rows=True)
    use_col = col.var(dim=1, unbiased=False) >= row.var(dim=1, unbiased=False)
    return torch.where(use_col[:, None], col, row).to(torch.float32)
