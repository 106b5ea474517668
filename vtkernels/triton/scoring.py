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

A head is never one tile: every kernel walks head_dim in BLOCK_D chunks (the logits accumulate
chunk by chunk), so PruMerge's single 1024-channel head or a 1280-wide Qwen head needs no more
registers or shared memory than a 64-channel one. Block sizes, warps and compile-time switches
come from the pure `_*_config` functions (shapes and dtype in, launch options out), which the
compile check (python_tests/test_triton_compile.py) sees through the real launchers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _validate as V
from . import _launch

__all__ = ["cls_attention", "attention_received", "fopru_significance"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _scale_tensor(scale, head_dim: int, acc: torch.dtype, device) -> torch.Tensor:
    # A Python float kernel argument would arrive as float32; a one-element tensor carries the
    # scale in the accumulation dtype, rounded exactly as the reference's `logits * scale`.
    value = head_dim ** -0.5 if scale is None else float(scale)
    return torch.full((1,), value, dtype=acc, device=device)


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

def _cls_logits_config(T: int, DH: int, dtype: torch.dtype, interpret: bool) -> dict:
    # [BLOCK_T, BLOCK_D] key chunks of 2K elements (1K in float64): 16 (float64: 8) values per
    # thread at 4 warps, whatever the head size.
    block_d = min(64, max(16, triton.next_power_of_2(DH)))
    if interpret:
        block_t = min(256, max(16, triton.next_power_of_2(T)))
    else:
        block_t = (1024 if dtype == torch.float64 else 2048) // block_d
    return dict(ACC=_tl_acc(dtype), BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)


def _cls_softmax_config(T: int, H: int, dtype: torch.dtype) -> dict:
    block_h = triton.next_power_of_2(H)
    budget = 2048 if dtype == torch.float64 else 4096  # [BLOCK_H, BLOCK_T] elements per step
    block_t = max(16, min(triton.next_power_of_2(T), budget // block_h))
    return dict(ACC=_tl_acc(dtype), BLOCK_H=block_h, BLOCK_T=block_t, num_warps=4)


@triton.jit
def _cls_logits_kernel(
    q_ptr, q_sb, q_sc,
    k_ptr, k_sb, k_st, k_sc,
    scale_ptr,
    lg_ptr,
    T, H, DH,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Logits of the CLS query against one block of keys of one head.

    lg[b, h, j] = s * sum_d q[b, 0, h*Dh + d] * k[b, j, h*Dh + d]   for j in this block,
    the sum over d taken in BLOCK_D chunks. Grid (B*H, cdiv(T, BLOCK_T)): k is read once in
    total, and a single image still spreads over H * T / BLOCK_T programs.
    """
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = bh % H
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    q_row = q_ptr + b * q_sb
    k_rows = k_ptr + b * k_sb + t[:, None].to(tl.int64) * k_st
    acc = tl.zeros([BLOCK_T], ACC)
    for d0 in range(0, DH, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < DH
        c = h * DH + d
        qv = _widen(tl.load(q_row + c * q_sc, mask=dmask, other=0.0), ACC)
        kv = _widen(tl.load(k_rows + c[None, :] * k_sc, mask=tmask[:, None] & dmask[None, :], other=0.0),
                    ACC)
        acc += tl.sum(kv * qv[None, :], axis=1)
    scale = tl.load(scale_ptr)
    tl.store(lg_ptr + bh.to(tl.int64) * T + t, acc * scale, mask=tmask)


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


@_launch.on_inputs_device
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
    cfg = _cls_logits_config(T, DH, q.dtype, _launch.interpreting())
    _cls_logits_kernel[(B * H, triton.cdiv(T, cfg["BLOCK_T"]))](
        q, q.stride(0), q.stride(2),
        k, k.stride(0), k.stride(1), k.stride(2),
        scale_t, logits, T, H, DH, **cfg,
    )
    _cls_softmax_kernel[(B,)](logits, out, T, H, N, **_cls_softmax_config(T, H, q.dtype))
    return out


# --- attention_received / fopru_significance -----------------------------------------------

def _patch_attention_config(T: int, DH: int, dtype: torch.dtype, has_cls: bool, with_rows: bool,
                            interpret: bool) -> dict:
    tp = max(16, triton.next_power_of_2(T))
    # tl.dot needs every tile dimension >= 16; padding channels are masked to zero. A head that
    # fits one chunk keeps its q tile loaded once; wider heads loop over chunks.
    dp = max(16, triton.next_power_of_2(DH))
    # Chosen with the compile check: tiles that compile without a register spill on sm_80 and
    # sm_90 at every head size. 8 warps throughout: at 4, ptxas holds these kernels to about 128
    # registers per thread and spills (float32 "ieee" and float64 dots run on FMA units, no
    # tensor cores, and keep their operands in registers).
    if dtype == torch.float64:
        block_m, block_n, block_d = 32, 32, min(dp, 16)
    elif dtype == torch.float32:
        block_m, block_n, block_d = 64, 32, min(dp, 64)
    else:
        block_m, block_n, block_d = 64, 64, min(dp, 128)
    if interpret:  # big tiles: fewer interpreted steps (the head keeps the GPU's chunking)
        block_m = block_n = 128
    return dict(
        OFF=1 if has_cls else 0, WITH_ROWS=bool(with_rows), ACC=_tl_acc(dtype),
        # Under the interpreter float16/bfloat16 tiles are widened before tl.dot (see the kernel).
        WIDEN=interpret and dtype not in (torch.float32, torch.float64),
        BLOCK_M=min(block_m, tp), BLOCK_N=min(block_n, tp), BLOCK_D=block_d,
        NUM_D=triton.cdiv(DH, block_d), num_warps=8,
    )


@triton.jit
def _qk_tile(q0, q_rows, q_sc, k_cols, k_sc, c0, DH, rmask, cmask,
             ACC: tl.constexpr, WIDEN: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_D: tl.constexpr):
    """[BLOCK_M, BLOCK_N] = Q K^T over the head's channels c0 .. c0 + DH - 1, BLOCK_D at a time.

    With NUM_D == 1, q0 is the caller's resident q tile; otherwise each chunk of q is reloaded
    (an L1/L2 hit), which is what keeps registers and shared memory independent of DH.
    """
    s = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    if NUM_D == 1:
        d = tl.arange(0, BLOCK_D)
        dmask = d < DH
        kt = tl.load(k_cols + (c0 + d)[:, None] * k_sc, mask=dmask[:, None] & cmask[None, :], other=0.0)
        if WIDEN:
            kt = _widen(kt, ACC)
        # "ieee": float32 inputs must not drop to TF32 (the reference is full float32).
        s = tl.dot(q0, kt, s, input_precision="ieee", out_dtype=ACC)
    else:
        for d0 in range(0, DH, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dmask = d < DH
            qc = tl.load(q_rows + (c0 + d)[None, :] * q_sc, mask=rmask[:, None] & dmask[None, :], other=0.0)
            kt = tl.load(k_cols + (c0 + d)[:, None] * k_sc, mask=dmask[:, None] & cmask[None, :], other=0.0)
            if WIDEN:
                qc = _widen(qc, ACC)
                kt = _widen(kt, ACC)
            s = tl.dot(qc, kt, s, input_precision="ieee", out_dtype=ACC)
    return s


@triton.jit
def _patch_attention_kernel(
    q_ptr, q_sb, q_st, q_sc,
    k_ptr, k_sb, k_st, k_sc,
    scale_ptr,
    colp_ptr,
    rowp_ptr,
    T, N, H, DH, NQB,
    OFF: tl.constexpr, WITH_ROWS: tl.constexpr, ACC: tl.constexpr, WIDEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_D: tl.constexpr,
):
    """Column (and row) sums of one head's attention over one block of query rows.

    Program (b*H + h, qb) owns query rows i in [qb*BLOCK_M, (qb+1)*BLOCK_M).
    Pass 1 over key blocks: S = s * Q K^T (tl.dot on [BLOCK_M, BLOCK_D] x [BLOCK_D, BLOCK_N]
    chunks of the head, accumulated), online m[i] = max_j S[i, j], l[i] = sum_j exp(S[i, j] - m[i]).
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
    c0 = h * DH
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < T
    q_rows = q_ptr + b * q_sb + rows[:, None].to(tl.int64) * q_st
    if NUM_D == 1:
        d = tl.arange(0, BLOCK_D)
        q0 = tl.load(q_rows + (c0 + d)[None, :] * q_sc, mask=rmask[:, None] & (d < DH)[None, :], other=0.0)
        if WIDEN:
            q0 = _widen(q0, ACC)
    else:
        q0 = 0.0  # unused: _qk_tile reloads q chunk by chunk
    scale = tl.load(scale_ptr)
    k_base = k_ptr + b * k_sb

    m = tl.full([BLOCK_M], float("-inf"), ACC)
    l = tl.zeros([BLOCK_M], ACC)
    for start in range(0, T, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < T
        s = _qk_tile(q0, q_rows, q_sc, k_base + cols[None, :].to(tl.int64) * k_st, k_sc, c0, DH,
                     rmask, cmask, ACC, WIDEN, BLOCK_M, BLOCK_N, BLOCK_D, NUM_D) * scale
        s = tl.where(cmask[None, :], s, float("-inf"))
        # Key block 0 always holds a real key, so m is finite from the first block on and
        # exp(m_old - m_new) never sees inf - inf.
        m_new = tl.maximum(m, tl.max(s, axis=1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m = m_new

    inv_l = 1.0 / l
    row_patch = (rows >= OFF) & rmask
    row_acc = tl.zeros([BLOCK_M], ACC)
    colp_row = colp_ptr + ((b * H + h) * NQB + qb) * N
    for start in range(0, T, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < T
        s = _qk_tile(q0, q_rows, q_sc, k_base + cols[None, :].to(tl.int64) * k_st, k_sc, c0, DH,
                     rmask, cmask, ACC, WIDEN, BLOCK_M, BLOCK_N, BLOCK_D, NUM_D) * scale
        col_patch = (cols >= OFF) & cmask
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
    cfg = _patch_attention_config(T, DH, q.dtype, has_cls, with_rows, _launch.interpreting())
    nqb = triton.cdiv(T, cfg["BLOCK_M"])
    scale_t = _scale_tensor(scale, DH, acc, q.device)
    colp = torch.empty((B, H, nqb, N), dtype=acc, device=q.device)
    rowp = torch.empty((B, H, N), dtype=acc, device=q.device) if with_rows else colp
    _patch_attention_kernel[(B * H, nqb)](
        q, q.stride(0), q.stride(1), q.stride(2),
        k, k.stride(0), k.stride(1), k.stride(2),
        scale_t, colp, rowp, T, N, H, DH, nqb, **cfg,
    )
    # Small [B, H, nqb, N] -> [B, N] reductions: torch's (non-atomic) sums are deterministic.
    col = colp.sum(dim=2).sum(dim=1) / (H * N)
    row = rowp.sum(dim=1) / (H * N) if with_rows else None
    return col, row


@_launch.on_inputs_device
def attention_received(q, k, num_heads: int, scale=None, has_cls: bool = True) -> torch.Tensor:
    """Attention each patch key receives, mean over heads and patch queries: float32 [B, N]."""
    col, _ = _patch_sums(q, k, num_heads, scale, has_cls, with_rows=False)
    return col.to(torch.float32)


@_launch.on_inputs_device
def fopru_significance(q, k, num_heads: int, scale=None, has_cls: bool = True) -> torch.Tensor:
    """FoPru significance: column means if Var(col) >= Var(row) (population), else row means."""
    col, row = _patch_sums(q, k, num_heads, scale, has_cls, with_rows=True)
    use_col = col.var(dim=1, unbiased=False) >= row.var(dim=1, unbiased=False)
    return torch.where(use_col[:, None], col, row).to(torch.float32)
