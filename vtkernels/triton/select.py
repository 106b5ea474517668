"""Triton kernels for token selection: topk_indices, gather_tokens, fopru_select.

Ranking rule (ALGORITHMS.md, reference.rank_order): higher score first; equal scores rank the
lower position first; NaN ranks below every number (below -inf); -0.0 equals +0.0. Indices
are bit-identical to the reference because the ranking is done on exact integer keys:

  key(x)  for float32 scores: b = bits(x) as int32, key = b ^ ((b >> 31) & 0x7FFFFFFF),
          except that both zeros get key 0 (so -0.0 == +0.0) and every NaN gets INT32_MIN
          (below -inf's key 0x807FFFFF). For float64 scores the same with int64 and
          0x7FFF_FFFF_FFFF_FFFF. For float16/bfloat16 scores the same on the raw 16-bit
          pattern, sign-extended to int32 (mask 0x7FFF; NaN: magnitude above 0x7C00 / 0x7F80):
          no float conversion at all, so subnormals keep their value everywhere (the Triton
          interpreter's bfloat16 -> float32 conversion mangles subnormals).
          Signed integer order of the keys is the score order, and keys are only compared
          within one row of one dtype, so ranking the scores' own bits ranks exactly like the
          reference's float64 copy of them.

  top k   tau = the k-th largest key, found bit by bit, high to low: start from INT_MIN; take
          0 if count(key >= 0) >= k; then for each lower bit, cand = tau | bit and
          tau = cand if count(key >= cand) >= k. The selected set is every key > tau plus the
          first (k - count(key > tau)) keys == tau in position order (exclusive tl.cumsum over
          the tie mask), which is exactly the first k entries of the stable ranking. Selected
          positions are written ascending: the output slot of a selected position is the
          exclusive cumsum of the selection mask (carried across blocks).

One program per row; rows longer than one block are streamed block by block (a row that fits
one block is loaded once and searched in registers). Block sizes, warps and compile-time
switches come from the pure `_*_config` functions, which the compile check
(python_tests/test_triton_compile.py) sees through the real launchers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _validate as V
from . import _launch

__all__ = ["topk_indices", "gather_tokens", "fopru_select"]

# Largest row kept in registers by one program; longer rows stream in blocks of this size.
# (Module-level so tests can shrink it to exercise the multi-block path.)
_MAX_BLOCK = 4096


def _row_block(n: int):
    """(BLOCK, ONE_BLOCK, num_warps) for a row of n keys."""
    block = min(max(16, triton.next_power_of_2(n)), _MAX_BLOCK)
    return block, n <= block, 4 if block <= 1024 else 8


# --- ranking primitives --------------------------------------------------------------------

@triton.jit
def _rank_key(x, KEY64: tl.constexpr):
    """Order-preserving signed integer key (see the module docstring).

    Zero and NaN are recognised from the bits, not by float compares, so a flush-to-zero
    compare can never merge a denormal with zero. KEY64 keys take float64 x.
    """
    if KEY64:
        bits = x.to(tl.float64).to(tl.int64, bitcast=True)
        mag = bits & 0x7FFFFFFFFFFFFFFF
        key = bits ^ ((bits >> 63) & 0x7FFFFFFFFFFFFFFF)
        key = tl.where(mag == 0, 0, key)  # -0.0 ranks as +0.0
        key = tl.where(mag > 0x7FF0000000000000, -9223372036854775807 - 1, key)  # NaN
    elif x.dtype.is_fp16() or x.dtype.is_bf16():
        # Raw 16-bit pattern, sign-extended: bits >> 31 is the sign, bits & 0x7FFF the
        # magnitude pattern, exactly as for float32 one size down.
        bits = x.to(tl.int16, bitcast=True).to(tl.int32)
        mag = bits & 0x7FFF
        key = bits ^ ((bits >> 31) & 0x7FFF)
        key = tl.where(mag == 0, 0, key)
        if x.dtype.is_fp16():
            key = tl.where(mag > 0x7C00, -2147483647 - 1, key)
        else:
            key = tl.where(mag > 0x7F80, -2147483647 - 1, key)
    else:
        bits = x.to(tl.float32).to(tl.int32, bitcast=True)
        mag = bits & 0x7FFFFFFF
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        key = tl.where(mag == 0, 0, key)
        key = tl.where(mag > 0x7F800000, -2147483647 - 1, key)
    return key


@triton.jit
def _to_f64(x):
    """x as float64, exactly: bfloat16 goes through its bits (bits << 16 is the float32 pattern)
    because the interpreter's bfloat16 conversion mangles subnormals; the rest convert as is."""
    if x.dtype.is_bf16():
        y = (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
        y = y.to(tl.float64)
    else:
        y = x.to(tl.float64)
    return y


@triton.jit
def _load_keys(ptr, stride, n, offs, KEY64: tl.constexpr):
    valid = offs < n
    x = tl.load(ptr + offs.to(tl.int64) * stride, mask=valid, other=0.0)
    return _rank_key(x, KEY64), valid


@triton.jit
def _count_at_least(ptr, stride, n, cand, keys0, valid0,
                    KEY64: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """count(key >= cand) over the row; keys0/valid0 are the row's first block."""
    cnt = tl.sum((valid0 & (keys0 >= cand)).to(tl.int32), axis=0)
    if not ONE_BLOCK:
        for start in range(BLOCK, n, BLOCK):
            key, valid = _load_keys(ptr, stride, n, start + tl.arange(0, BLOCK), KEY64)
            cnt += tl.sum((valid & (key >= cand)).to(tl.int32), axis=0)
    return cnt


@triton.jit
def _kth_key(ptr, stride, n, k, KEY64: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """Returns (tau, count(key > tau)) where tau is the k-th largest key of the row, 1 <= k <= n.

    Invariant: count(key >= tau) >= k; each step keeps the largest tau with that property
    among those sharing the bits decided so far, so after the last bit tau is the maximum,
    i.e. a key value that occurs, with fewer than k keys above it.
    """
    keys0, valid0 = _load_keys(ptr, stride, n, tl.arange(0, BLOCK), KEY64)
    if KEY64:
        tau = tl.full([], -9223372036854775807 - 1, tl.int64)
        bit = tl.full([], 1 << 62, tl.int64)
    else:
        tau = tl.full([], -2147483647 - 1, tl.int32)
        bit = tl.full([], 1 << 30, tl.int32)
    zero = tau - tau
    # Sign bit first: in two's complement INT_MIN | bits and 0 | bits both grow with bits.
    cnt = _count_at_least(ptr, stride, n, zero, keys0, valid0, KEY64, BLOCK, ONE_BLOCK)
    tau = tl.where(cnt >= k, zero, tau)
    while bit > 0:
        cand = tau | bit
        cnt = _count_at_least(ptr, stride, n, cand, keys0, valid0, KEY64, BLOCK, ONE_BLOCK)
        tau = tl.where(cnt >= k, cand, tau)
        bit = bit >> 1
    # key > tau  <=>  key >= tau + 1 (no overflow: the largest key, +inf's, is far below MAX).
    n_gt = _count_at_least(ptr, stride, n, tau + 1, keys0, valid0, KEY64, BLOCK, ONE_BLOCK)
    return tau, n_gt


@triton.jit
def _write_top(ptr, stride, n, tau, n_take_eq, out_ptr, out_base, value_base,
               KEY64: tl.constexpr, BLOCK: tl.constexpr):
    """Writes value_base + position of every selected entry, ascending, at out_ptr[out_base + slot].

    Selected = key > tau, or key == tau among the first n_take_eq such positions.
    """
    eq_seen = tl.full([], 0, tl.int32)
    written = tl.full([], 0, tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        key, valid = _load_keys(ptr, stride, n, offs, KEY64)
        eq = (valid & (key == tau)).to(tl.int32)
        eq_rank = eq_seen + tl.cumsum(eq, axis=0) - eq
        sel = valid & ((key > tau) | ((eq != 0) & (eq_rank < n_take_eq)))
        sel_i = sel.to(tl.int32)
        slot = written + tl.cumsum(sel_i, axis=0) - sel_i
        tl.store(out_ptr + out_base + slot, value_base + offs.to(tl.int64), mask=sel)
        eq_seen += tl.sum(eq, axis=0)
        written += tl.sum(sel_i, axis=0)


# --- topk_indices --------------------------------------------------------------------------

# Counts stay runtime values: Triton would otherwise turn an argument equal to 1 into a
# compile-time constant, and the kernels treat them as tensors.
@triton.jit(do_not_specialize=["N", "K"])
def _topk_kernel(
    s_ptr, s_sb, s_sn,
    out_ptr,
    N, K,
    KEY64: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    """out[b, :] = the K best positions of scores[b, :], ascending (module docstring)."""
    b = tl.program_id(0).to(tl.int64)
    row = s_ptr + b * s_sb
    tau, n_gt = _kth_key(row, s_sn, N, K, KEY64, BLOCK, ONE_BLOCK)
    _write_top(row, s_sn, N, tau, K - n_gt, out_ptr, b * K, 0, KEY64, BLOCK)


def _topk_config(N: int, dtype: torch.dtype) -> dict:
    block, one, warps = _row_block(N)
    return dict(KEY64=dtype == torch.float64, BLOCK=block, ONE_BLOCK=one, num_warps=warps)


def _topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    B, N = scores.shape
    out = torch.empty((B, k), dtype=torch.int64, device=scores.device)
    if B == 0:
        return out
    _topk_kernel[(B,)](
        scores, scores.stride(0), scores.stride(1), out, N, k, **_topk_config(N, scores.dtype),
    )
    return out


@_launch.on_inputs_device
def topk_indices(scores, k: int) -> torch.Tensor:
    """Positions of the k highest scores per row, ascending, int64 [B, k] (reference tie rule)."""
    B, N = V.check_scores(scores)
    V.check_count("k", k, N)
    return _topk(scores, int(k))


# --- gather_tokens -------------------------------------------------------------------------

@triton.jit
def _gather_kernel(
    x_ptr, x_sb, x_sn, x_sd,
    i_ptr, i_sb, i_sk,
    out_ptr,
    N, K, D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, r, :] = x[b, idx[b, r], :] for a [BLOCK_R, BLOCK_D] tile; out is contiguous.

    An index outside [0, N) (only possible when the host skipped the range check, under CUDA
    graph capture) reads nothing and writes a zero row.
    """
    b = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = r < K
    dmask = d < D
    idx = tl.load(i_ptr + b * i_sb + r * i_sk, mask=rmask, other=0).to(tl.int64)
    inside = (idx >= 0) & (idx < N)
    m = rmask[:, None] & dmask[None, :]
    v = tl.load(x_ptr + b * x_sb + idx[:, None] * x_sn + d[None, :] * x_sd, mask=m & inside[:, None],
                other=0.0)
    tl.store(out_ptr + (b * K + r[:, None]) * D + d[None, :], v, mask=m)


def _gather_config(K: int, D: int, interpret: bool) -> dict:
    if interpret:
        block_r, block_d = min(64, triton.next_power_of_2(K)), min(1024, triton.next_power_of_2(D))
    else:
        block_r, block_d = min(16, triton.next_power_of_2(K)), min(256, triton.next_power_of_2(D))
    return dict(BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)


def _gather(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    B, N, D = x.shape
    K = indices.shape[1]
    out = torch.empty((B, K, D), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    cfg = _gather_config(K, D, _launch.interpreting())
    grid = (B, triton.cdiv(K, cfg["BLOCK_R"]), triton.cdiv(D, cfg["BLOCK_D"]))
    _gather_kernel[grid](
        x, x.stride(0), x.stride(1), x.stride(2),
        indices, indices.stride(0), indices.stride(1),
        out, N, K, D, **cfg,
    )
    return out


def _check_gather_range(indices: torch.Tensor, N: int) -> None:
    """indices in [0, N), with at most one host wait (both bounds come back in one copy).

    While a CUDA graph is being captured any host wait would break the capture, so the check is
    skipped there: a captured gather is not range-checked, and an out-of-range index yields a
    zero row (the kernel masks it) instead of an error.
    """
    if indices.numel() == 0:
        return
    if _launch.capturing(indices):
        return
    lo, hi = torch.stack(torch.aminmax(indices)).tolist()
    if lo < 0 or hi >= N:
        raise ValueError(f"indices must lie in [0, N) with N={N}, got values in [{lo}, {hi}]")


@_launch.on_inputs_device
def gather_tokens(x, indices) -> torch.Tensor:
    """Rows of x [B, N, D] at indices [B, k] (int64/int32, in [0, N)), in that order: [B, k, D].

    One host wait for the range check (none under CUDA graph capture: see _check_gather_range).
    """
    V.check_gather(x, indices)
    _check_gather_range(indices, x.shape[1])
    return _gather(x, indices)


# --- fopru_select --------------------------------------------------------------------------

@triton.jit(do_not_specialize=["R", "W"])
def _row_sums_kernel(
    s_ptr, s_sb, s_sn,
    rs_ptr,
    R, W,
    BLOCK_R: tl.constexpr,
):
    """rs[b, i] = ((0 + s[b, i*W]) + s[b, i*W + 1]) + ... in float64, strictly left to right.

    The addition order is part of the contract (reference.fopru_row_indices): row sums, and so
    the row ranking, are bit-identical on every backend. Vectorised over rows.
    """
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    imask = i < R
    base = s_ptr + b * s_sb + (i.to(tl.int64) * W) * s_sn
    acc = tl.zeros([BLOCK_R], tl.float64)
    for w in range(W):
        acc += _to_f64(tl.load(base + w * s_sn, mask=imask, other=0.0))
    tl.store(rs_ptr + b * R + i, acc, mask=imask)


@triton.jit(do_not_specialize=["R", "W", "KEEP"])
def _fopru_row_kernel(
    s_ptr, s_sb, s_sn,
    rs_ptr,
    out_ptr,
    R, W, KEEP,
    KEY64: tl.constexpr,
    BLOCK_R: tl.constexpr, ONE_BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr, ONE_BLOCK_W: tl.constexpr,
):
    """FoPru row strategy for one image: R x W grid, keep = full * W + rem.

    Rows are ranked by rs (float64 keys). Let kk = full + (rem > 0) and tau, n_gt the kk-th
    largest row key and the count above it; need = kk - n_gt rows with key == tau are taken,
    in position order. The full rows are those with key > tau plus the first
    need - (rem > 0) ties; when rem > 0 the next-best row r is the need-th tie (rank kk).
    Output slot of a token = W * (full rows above its row) + its rank within its row's kept
    tokens, with row r's rem best tokens (same ranking, scores' own key width) written at
    base_r = W * (full rows with index < r) -- ascending raster order overall.
    """
    b = tl.program_id(0).to(tl.int64)
    full = KEEP // W
    rem = KEEP % W
    has_rem = (rem > 0).to(tl.int32)
    kk = full + has_rem
    rs_row = rs_ptr + b * R
    tau, n_gt = _kth_key(rs_row, 1, R, kk, True, BLOCK_R, ONE_BLOCK_R)
    need = kk - n_gt
    need_full = need - has_rem
    out_row = out_ptr + b * KEEP

    eq_seen = tl.full([], 0, tl.int32)
    written = tl.full([], 0, tl.int32)
    r_sel = tl.full([], -1, tl.int32)
    base_r = tl.full([], 0, tl.int32)
    for start in range(0, R, BLOCK_R):
        i = start + tl.arange(0, BLOCK_R)
        key, valid = _load_keys(rs_row, 1, R, i, True)
        eq = (valid & (key == tau)).to(tl.int32)
        eq_rank = eq_seen + tl.cumsum(eq, axis=0) - eq
        is_full = valid & ((key > tau) | ((eq != 0) & (eq_rank < need_full)))
        is_part = (eq != 0) & (eq_rank == need - 1) & (has_rem != 0)
        cnt = tl.where(is_full, W, 0) + tl.where(is_part, rem, 0)
        base = written + tl.cumsum(cnt, axis=0) - cnt
        out_pos = (i * W).to(tl.int64)
        for c in range(W):
            tl.store(out_row + base + c, out_pos + c, mask=is_full)
        r_sel = tl.maximum(r_sel, tl.max(tl.where(is_part, i, -1), axis=0))
        base_r += tl.sum(tl.where(is_part, base, 0), axis=0)
        eq_seen += tl.sum(eq, axis=0)
        written += tl.sum(cnt, axis=0)

    if rem > 0:
        part = s_ptr + b * s_sb + (r_sel.to(tl.int64) * W) * s_sn
        tau2, n_gt2 = _kth_key(part, s_sn, W, rem, KEY64, BLOCK_W, ONE_BLOCK_W)
        _write_top(part, s_sn, W, tau2, rem - n_gt2, out_row, base_r,
                   r_sel.to(tl.int64) * W, KEY64, BLOCK_W)


def _row_sums_config(R: int) -> dict:
    return dict(BLOCK_R=min(max(16, triton.next_power_of_2(R)), 1024), num_warps=4)


def _fopru_row_config(R: int, W: int, dtype: torch.dtype) -> dict:
    block_r, one_r, warps_r = _row_block(R)
    block_w, one_w, warps_w = _row_block(W)
    return dict(KEY64=dtype == torch.float64, BLOCK_R=block_r, ONE_BLOCK_R=one_r,
                BLOCK_W=block_w, ONE_BLOCK_W=one_w, num_warps=max(warps_r, warps_w))


def _fopru_row(scores: torch.Tensor, keep: int, grid_width: int) -> torch.Tensor:
    B, N = scores.shape
    W = V.grid_width_of(N, grid_width)
    R = N // W
    out = torch.empty((B, keep), dtype=torch.int64, device=scores.device)
    if B == 0:
        return out
    rowsum = torch.empty((B, R), dtype=torch.float64, device=scores.device)
    cfg = _row_sums_config(R)
    _row_sums_kernel[(B, triton.cdiv(R, cfg["BLOCK_R"]))](
        scores, scores.stride(0), scores.stride(1), rowsum, R, W, **cfg,
    )
    _fopru_row_kernel[(B,)](
        scores, scores.stride(0), scores.stride(1), rowsum, out, R, W, keep,
        **_fopru_row_config(R, W, scores.dtype),
    )
    return out


@_launch.on_inputs_device
def fopru_select(x, scores, keep: int, strategy: str = "rank", grid_width: int = 0):
    """FoPru selection: (kept tokens [B, keep, D], indices int64 [B, keep] ascending)."""
    V.check_fopru_select(x, scores, keep, strategy, grid_width)
    keep = int(keep)
    if strategy == "rank":
        idx = _topk(scores, keep)
    else:
        idx = _fopru_row(scores, keep, int(grid_width))
    return _gather(x, idx), idx
