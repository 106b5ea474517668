"""Triton kernels of attention_received_varlen: attention received within packed segments.

Notation: q, k are [S, C], the images of a Qwen-VL tower packed along S; segment s is the token
range [s0, s1) = [cu[s], cu[s+1]) of n = s1 - s0 tokens; H heads of Dh = C / H channels; scale
(head_dim ** -0.5 unless given). Per segment and head, with i, j in [s0, s1),

    S_h[i, j] = scale * sum_d q[i, h*Dh + d] k[j, h*Dh + d]
    m_h[i] = max_j S_h[i, j],   l_h[i] = sum_j exp(S_h[i, j] - m_h[i])
    out[j] = 1/(H n) sum_h sum_i exp(S_h[i, j] - m_h[i]) / l_h[i]

Two kernels, each over the packed sequence in blocks aligned to segment starts (a block never
straddles two segments, and no segment is padded to the longest):
  1. _varlen_row_stats_kernel, one program per (query block, head): m and l of its rows, online
     over the segment's key blocks (l rescaled by exp(m_old - m_new) when the max grows).
  2. _varlen_col_sums_kernel, one program per (key block, head): recomputes the logits against
     every query block of the segment and sums exp(S - m) / l down the columns in registers.
Each program owns its outputs, so there are no atomics and no partial-sum buffers: the
result is run-to-run deterministic, and the memory is [H, S] for m, l and the per-head column
means (summed over heads by torch at the end, a fixed-order reduction). Each logit is computed
twice, the price of that determinism.

Block b of the packed sequence belongs to the segment s with first[s] <= b < first[s+1], where
first = the exclusive cumulative sum of cdiv(n_s, BLOCK) (computed on the device: no host
sync); a program finds s by binary search over first. The grid is sized by the shapes alone (S
and the number of segments n, no values): sum_s cdiv(n_s, BLOCK) <= cdiv(S, BLOCK) + n, and
programs past the last block return at once. head_dim is looped in BLOCK_D chunks
(_launch_config), so the tiles (and the shared memory) do not grow with it. Accumulation is
float32, or float64 for float64 inputs; the output is float32.

The value check of cu_seqlens (starts at 0, non-decreasing, ends at S) reads the values on the
host: it runs in eager mode and is skipped while a CUDA graph is being captured (a capture may
not wait on the device). Segment bounds are clamped to [0, S] in the kernels, so even bad values
under capture never make a program read or write out of bounds (the scores are then meaningless).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .. import _validate as V
from ._launch import interpreting as _interpreting
from .scoring import _acc_dtype, _scale_tensor, _tl_acc, _widen

__all__ = ["attention_received_varlen"]


def _launch_config(S: int, C: int, num_heads: int, dtype: torch.dtype) -> dict:
    """Block sizes and launch options of both kernels: a pure function of the shapes and dtype.

    BLOCK_M query rows x BLOCK_N keys per logits tile; BLOCK_D channels per tl.dot. Every head is
    looped in chunks of at most 64 channels (32 in float64; a power of two >= 16, as tl.dot
    needs), so the tiles do not grow with head_dim (1280 and beyond); heads that fit one chunk
    are looped too (keeping the program's own q tile loaded across the key loop spilled on sm_90:
    python_tests/test_triton_compile.py). The dot operands of float32 and float64 (no tensor
    cores: "ieee" FMA dots) sit in registers: 32 x 32 tiles there (64 x 64 spilled on sm_80),
    64 x 64 with 8 warps for 16-bit. Shared memory of the dot operands, num_stages * (BLOCK_M +
    BLOCK_N) * BLOCK_D elements: at most 48 KiB, far inside Hopper's 227 KiB.
    """
    head_dim = C // num_heads
    wide = dtype in (torch.float32, torch.float64)
    block = 32 if wide else 64
    chunk = 32 if dtype == torch.float64 else 64
    block_d = min(chunk, max(16, triton.next_power_of_2(head_dim)))
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, num_warps=4 if wide else 8, num_stages=2)

@triton.jit
def _segment_of(first_ptr, NSEG, pid):
    """(segment, block index inside it) of block pid: the last s with first[s] <= pid.

    first[0] = 0 <= pid < first[NSEG] and first is non-decreasing (empty segments repeat a
    value), so the invariant first[lo] <= pid < first[hi] holds until hi = lo + 1.
    """
    lo = pid * 0
    hi = lo + NSEG
    while hi - lo > 1:
        mid = (lo + hi) // 2
        go = tl.load(first_ptr + mid) <= pid
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return lo, pid - tl.load(first_ptr + lo)


@triton.jit
def _segment_bounds(cu_ptr, seg, S):
    """[s0, s1) of segment seg, clamped to [0, S] (only bad values under graph capture need it)."""
    s0 = tl.minimum(tl.maximum(tl.load(cu_ptr + seg), 0), S).to(tl.int32)
    s1 = tl.minimum(tl.maximum(tl.load(cu_ptr + seg + 1), s0), S).to(tl.int32)
    return s0, s1


@triton.jit
def _load_rows(ptr, s_row, s_col, rows, rmask, c, cmask, ACC: tl.constexpr, WIDEN: tl.constexpr):
    """Tile [len(rows), len(c)] of a [S, C] tensor (zeros outside the masks)."""
    t = tl.load(ptr + rows[:, None].to(tl.int64) * s_row + c[None, :].to(tl.int64) * s_col,
                mask=rmask[:, None] & cmask[None, :], other=0.0)
    if WIDEN:
        t = _widen(t, ACC)
    return t


@triton.jit
def _qk_chunked(q_ptr, q_ss, q_sc, k_ptr, k_ss, k_sc, rows, rmask, cols, cmask, c0, DH,
                ACC: tl.constexpr, WIDEN: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """sum_d q[rows, c0 + d] k[cols, c0 + d] over d < DH, BLOCK_D channels at a time."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for d0 in range(0, DH, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < DH
        qt = _load_rows(q_ptr, q_ss, q_sc, rows, rmask, c0 + d, dmask, ACC, WIDEN)
        # The transposed tile [channels, keys]: the same load with the roles of the strides swapped.
        kt = _load_rows(k_ptr, k_sc, k_ss, c0 + d, dmask, cols, cmask, ACC, WIDEN)
        # "ieee": float32 inputs must not drop to TF32 (the reference is full float32).
        acc += tl.dot(qt, kt, input_precision="ieee", out_dtype=ACC)
    return acc


@triton.jit
def _varlen_row_stats_kernel(
    q_ptr, q_ss, q_sc,
    k_ptr, k_ss, k_sc,
    cu_ptr, first_ptr, scale_ptr,
    m_ptr, l_ptr,
    S, NSEG, DH,
    ACC: tl.constexpr, WIDEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """m[h, i] and l[h, i] for the BLOCK_M query rows of program (query block, h).

    Online over the segment's key blocks: m_new = max(m, max_j S[i, j]),
    l = l * exp(m - m_new) + sum_j exp(S[i, j] - m_new). The first key block always holds a
    real key, so m is finite from then on and exp(m - m_new) never sees inf - inf.
    WIDEN (set by the launcher under the interpreter, for float16/bfloat16) converts the tiles to
    ACC before tl.dot: the interpreter's dot multiplies bfloat16 tiles as their uint16 storage.
    On a GPU the tiles stay 16-bit (tensor cores, ACC accumulation).
    """
    pid = tl.program_id(0)
    h = tl.program_id(1)
    if pid >= tl.load(first_ptr + NSEG):
        return
    seg, blk = _segment_of(first_ptr, NSEG, pid)
    s0, s1 = _segment_bounds(cu_ptr, seg, S)
    rows = s0 + blk * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < s1
    c0 = h * DH
    scale = tl.load(scale_ptr)

    m = tl.full([BLOCK_M], float("-inf"), ACC)
    l = tl.zeros([BLOCK_M], ACC)
    for j0 in range(s0, s1, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < s1
        s = _qk_chunked(q_ptr, q_ss, q_sc, k_ptr, k_ss, k_sc, rows, rmask, cols, cmask, c0, DH,
                        ACC, WIDEN, BLOCK_M, BLOCK_N, BLOCK_D)
        s = tl.where(cmask[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m = m_new
    tl.store(m_ptr + h * S + rows, m, mask=rmask)
    tl.store(l_ptr + h * S + rows, l, mask=rmask)


@triton.jit
def _varlen_col_sums_kernel(
    q_ptr, q_ss, q_sc,
    k_ptr, k_ss, k_sc,
    cu_ptr, first_ptr, scale_ptr,
    m_ptr, l_ptr,
    colh_ptr,
    S, NSEG, DH, H,
    ACC: tl.constexpr, WIDEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """colh[h, j] = 1/(H n) sum_i exp(S[i, j] - m[h, i]) / l[h, i] for the BLOCK_N keys j of
    program (key block, h), i over every query of the segment, BLOCK_M rows at a time (the same
    tiles as _varlen_row_stats_kernel: both step from the segment start)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    if pid >= tl.load(first_ptr + NSEG):
        return
    seg, blk = _segment_of(first_ptr, NSEG, pid)
    s0, s1 = _segment_bounds(cu_ptr, seg, S)
    cols = s0 + blk * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < s1
    c0 = h * DH
    scale = tl.load(scale_ptr)

    col = tl.zeros([BLOCK_N], ACC)
    for i0 in range(s0, s1, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        rmask = rows < s1
        s = _qk_chunked(q_ptr, q_ss, q_sc, k_ptr, k_ss, k_sc, rows, rmask, cols, cmask, c0, DH,
                        ACC, WIDEN, BLOCK_M, BLOCK_N, BLOCK_D)
        m = tl.load(m_ptr + h * S + rows, mask=rmask, other=0.0)
        l = tl.load(l_ptr + h * S + rows, mask=rmask, other=1.0)
        p = tl.exp(s * scale - m[:, None]) / l[:, None]
        col += tl.sum(tl.where(rmask[:, None], p, 0.0), axis=0)
    n = (s1 - s0).to(ACC)
    tl.store(colh_ptr + h * S + cols, col / (n * H), mask=cmask)


def _block_starts(cu_seqlens: torch.Tensor, block: int) -> torch.Tensor:
    """first[s] = number of blocks of `block` tokens in segments 0..s-1, int32 [n + 1], on the
    device (no host sync)."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).clamp_min(0).to(torch.int64)
    first = torch.zeros(cu_seqlens.numel(), dtype=torch.int32, device=cu_seqlens.device)
    first[1:] = torch.cumsum((lens + block - 1) // block, 0)
    return first


def attention_received_varlen(q, k, cu_seqlens, num_heads: int, scale=None) -> torch.Tensor:
    """Attention each token receives from the queries of its own segment, mean over heads and
    those queries: float32 [S]. q, k: [S, C] (any strides); cu_seqlens: int32/int64 [n + 1]."""
    S, C, n = V.check_varlen(q, k, cu_seqlens, num_heads, scale)
    if not (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        V.check_cu_seqlens_values(cu_seqlens, S)  # one host wait; not allowed while capturing
    H = int(num_heads)
    DH = C // H
    acc = _acc_dtype(q.dtype)
    if S == 0 or n == 0:
        return torch.zeros((S,), dtype=torch.float32, device=q.device)
    cfg = _launch_config(S, C, H, q.dtype)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    ctx = torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()
    with ctx:
        scale_t = _scale_tensor(scale, DH, acc, q.device)
        m = torch.empty((H, S), dtype=acc, device=q.device)
        l = torch.empty((H, S), dtype=acc, device=q.device)
        colh = torch.zeros((H, S), dtype=acc, device=q.device)  # zeros: defined even for bad cu under capture
        common = dict(ACC=_tl_acc(q.dtype), WIDEN=_interpreting() and q.dtype != acc,
                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=cfg["BLOCK_D"],
                      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        _varlen_row_stats_kernel[(triton.cdiv(S, bm) + n, H)](
            q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1),
            cu_seqlens, _block_starts(cu_seqlens, bm), scale_t, m, l,
            S, n, DH, **common)
        _varlen_col_sums_kernel[(triton.cdiv(S, bn) + n, H)](
            q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1),
            cu_seqlens, _block_starts(cu_seqlens, bn), scale_t, m, l, colh,
            S, n, DH, H, **common)
        return colh.sum(dim=0).to(torch.float32)
