"""Triton kernels of the GlimpsePrune ops: glimpse_logits and gather_cache (ALGORITHMS.md,
"GlimpsePrune", steps 2 and 5).

glimpse_logits. q [B, Hq, D] (the glimpse's query row of every head), k [B, Hkv, L, D] (a KV
cache's keys, any strides), G = Hq / Hkv query heads per kv head (GQA: head h reads h // G):

    lg[b, h, l]  = s * sum_d q[b, h, d] k[b, h // G, l, d]                      (logits kernel)
    out[b, h, l] = lg[b, h, l] - lse[b, h]  where key_mask[b, l], else -inf      (row kernel)
    lse[b, h]    = m + log sum_{l kept} exp(lg[b, h, l] - m),  m = max_{l kept} lg (0 if none)

The logits kernel runs one program per (b, kv head, block of keys) with the G query heads of that
kv head in one [G, BLOCK_L] tile, so every key is read once; head_dim is looped in chunks of up to
256. The [B, Hq, L] row is small, so the log-softmax is a second kernel, one program per row: an
online pass for (m, sum) with the sum rescaled whenever m grows, then one pass writing out. A row
with no key left is all -inf. Accumulation is float32, float64 for float64 inputs (exact products
for 16-bit inputs); the output is float32.

gather_cache. Every tensor [B, ..., L, D] gathered along dim -2 at index [B, M] (-1 and any value
outside [0, L) give zeros; the launcher rejects out-of-range values before, except while a CUDA
graph is captured, when the check would need a host wait). ONE launch serves every tensor: the
launcher describes each tensor in one row of an int64 table (its base address, its output's
address, strides), and the kernel turns the addresses back into pointers (int64 -> pointer cast).
A gather moves bits, so each row is copied as units of W bytes, the widest of 8/4/2/1 that the
row length, addresses and strides allow (the dtype itself never matters: tensors of different
dtypes share the launch), or element by element (W = element size) when D is not contiguous.
Middle dims are collapsed into one when their strides allow; a tensor whose middle dims cannot be
(rare: permuted heads) is copied contiguous first.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from .. import _validate as V
from ._launch import capturing
from ._launch import device_guard as _device_guard
from ._launch import interpreting as _interpreting
from .scoring import _tl_acc, _widen

__all__ = ["glimpse_logits", "gather_cache"]

_NATIVE = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


# --- glimpse_logits ------------------------------------------------------------------------

def _glimpse_logits_config(G: int, L: int, D: int, dtype: torch.dtype, interpret: bool = False) -> dict:
    """Meta-parameters of _glimpse_logits_kernel for G query heads per kv head, L keys, head_dim D.

    The [BLOCK_G, BLOCK_L, BLOCK_D] product tile holds about 4K values (2K in float64): 32 per
    thread at 4 warps, which leaves the registers for the tile's addresses (8K values reach
    ptxas' 255-register limit). At least 32 keys per block keep the key loads long, then head_dim
    chunks fill the budget (up to 256), then keys take what is left. The interpreter pays per
    program, not per register: there, tiles of up to 64K values.
    """
    budget = 65536 if interpret else (2048 if dtype == torch.float64 else 4096)
    block_g = triton.next_power_of_2(G)
    l_cap = max(16, min(256, triton.next_power_of_2(max(L, 1))))
    block_l = min(32, l_cap)
    block_d = max(16, min(256, triton.next_power_of_2(D), budget // (block_g * block_l)))
    block_l = max(16, min(l_cap, budget // (block_g * block_d)))
    return dict(ACC=_tl_acc(dtype), BLOCK_G=block_g, BLOCK_L=block_l, BLOCK_D=block_d, num_warps=4)


def _log_softmax_config(L: int, dtype: torch.dtype) -> dict:
    """Meta-parameters of _log_softmax_kernel for rows of L logits."""
    block_l = max(16, min(2048 if dtype == torch.float64 else 4096, triton.next_power_of_2(max(L, 1))))
    return dict(ACC=_tl_acc(dtype), BLOCK_L=block_l, num_warps=4 if block_l <= 1024 else 8)


@triton.jit
def _glimpse_logits_kernel(
    q_ptr, q_sb, q_sh, q_sd,
    k_ptr, k_sb, k_sh, k_sl, k_sd,
    scale_ptr,
    lg_ptr,
    Hq, Hkv, L, D, G,
    ACC: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """lg[b, kvh*G + g, l] = s * sum_d q[b, kvh*G + g, d] * k[b, kvh, l, d] for g < G and the keys
    l of block pid(1). Grid (B * Hkv, cdiv(L, BLOCK_L)); lg is contiguous [B, Hq, L]."""
    bh = tl.program_id(0)
    b = (bh // Hkv).to(tl.int64)
    kvh = bh % Hkv
    g = tl.arange(0, BLOCK_G)
    gmask = g < G
    h = kvh * G + g
    l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    lmask = l < L
    q_rows = q_ptr + b * q_sb + h[:, None].to(tl.int64) * q_sh
    k_rows = k_ptr + b * k_sb + kvh.to(tl.int64) * k_sh + l[:, None].to(tl.int64) * k_sl
    acc = tl.zeros([BLOCK_G, BLOCK_L], ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        qv = _widen(tl.load(q_rows + d[None, :] * q_sd, mask=gmask[:, None] & dmask[None, :], other=0.0), ACC)
        kv = _widen(tl.load(k_rows + d[None, :] * k_sd, mask=lmask[:, None] & dmask[None, :], other=0.0), ACC)
        # Products and sums in ACC, no tl.dot: a group of 1..8 heads is too thin for tensor cores,
        # and float32 must not drop to TF32 (the reference is full float32). The kernel is bound
        # by reading k anyway.
        acc += tl.sum(qv[:, None, :] * kv[None, :, :], axis=2)
    scale = tl.load(scale_ptr)
    out = lg_ptr + (b * Hq + h[:, None]) * L + l[None, :]
    tl.store(out, (acc * scale).to(lg_ptr.dtype.element_ty), mask=gmask[:, None] & lmask[None, :])


@triton.jit
def _log_softmax_kernel(
    lg_ptr,
    mask_ptr, m_sb, m_sl,
    out_ptr,
    Hq, L,
    HAS_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """out[r, l] = lg[r, l] - lse[r] where key l is kept, else -inf; one program per row r = b*Hq + h.

    Pass 1 (online): m = running max over kept keys, s = sum exp(lg - m), s rescaled by
    exp(m_old - m_new) when m grows; while no key has been seen m = -inf and the shift is 0
    (exp(-inf - 0) = 0, never inf - inf). lse = log(s) + shift: -inf for a row with no key kept.
    Pass 2 writes the row (in place when out is lg).
    """
    r = tl.program_id(0).to(tl.int64)
    b = r // Hq
    row = lg_ptr + r * L
    m = tl.full((), float("-inf"), ACC)
    s = tl.zeros((), ACC)
    for start in range(0, L, BLOCK_L):
        l = start + tl.arange(0, BLOCK_L)
        keep = l < L
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + b * m_sb + l * m_sl, mask=l < L, other=0) != 0)
        x = tl.load(row + l, mask=keep, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new).to(ACC)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        m = m_new
    lse = tl.log(s) + tl.where(m == float("-inf"), 0.0, m).to(ACC)
    for start in range(0, L, BLOCK_L):
        l = start + tl.arange(0, BLOCK_L)
        keep = l < L
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + b * m_sb + l * m_sl, mask=l < L, other=0) != 0)
        x = tl.load(row + l, mask=keep, other=0.0).to(ACC)
        y = tl.where(keep, x - lse, float("-inf"))
        tl.store(out_ptr + r * L + l, y.to(tl.float32), mask=l < L)


def glimpse_logits(q, k, scale=None, key_mask=None, log_softmax: bool = False) -> torch.Tensor:
    """float32 [B, Hq, L]: q . k * scale per query head (GQA), or its masked log-softmax over keys."""
    B, Hq, Hkv, L, D = V.check_glimpse(q, k, scale, key_mask)
    if q.dtype not in _NATIVE:  # other float formats (float8) widen exactly to float32
        q, k = q.float(), k.float()
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    G = Hq // Hkv
    with _device_guard(q.device):
        # A Python float kernel argument would arrive as float32; a one-element tensor carries
        # the scale in ACC, rounded as the reference's `logits * scale` rounds it.
        scale_t = torch.full((1,), D ** -0.5 if scale is None else float(scale), dtype=acc, device=q.device)
        # float64 logits stay float64 until the log-softmax has been taken, as in the reference.
        lg = torch.empty((B, Hq, L), dtype=acc, device=q.device) if log_softmax and acc != torch.float32 else out
        cfg = _glimpse_logits_config(G, L, D, q.dtype, _interpreting())
        _glimpse_logits_kernel[(B * Hkv, triton.cdiv(L, cfg["BLOCK_L"]))](
            q, q.stride(0), q.stride(1), q.stride(2),
            k, k.stride(0), k.stride(1), k.stride(2), k.stride(3),
            scale_t, lg, Hq, Hkv, L, D, G, **cfg,
        )
        if log_softmax:
            mask = key_mask.view(torch.uint8) if key_mask is not None else out  # out: unused placeholder
            _log_softmax_kernel[(B * Hq,)](
                lg, mask, mask.stride(0) if key_mask is not None else 0,
                mask.stride(1) if key_mask is not None else 0,
                out, Hq, L, HAS_MASK=key_mask is not None, **_log_softmax_config(L, q.dtype),
            )
    return out


# --- gather_cache --------------------------------------------------------------------------

# Columns of the per-tensor table (int64): addresses in bytes, counts and strides in units.
_SRC, _DST, _W, _U, _H, _SB, _SH, _SL, _SU, _TOTAL = range(10)
_COLS = 10


def _gather_cache_config(max_total: int, interpret: bool = False) -> dict:
    """Meta-parameters of _gather_cache_kernel for tensors of at most max_total output units:
    BLOCK units per program, 8 per thread at 4 warps (each carries a 64-bit source address; the
    loads of a thread are all issued before its stores). The interpreter pays per program: there,
    up to 64K units."""
    cap = 65536 if interpret else 1024
    return dict(BLOCK=max(128, min(cap, triton.next_power_of_2(max(max_total, 1)))), num_warps=4)


@triton.jit
def _copy_units(src_addr, dst_addr, src_off, w, ok, valid, UNIT: tl.constexpr):
    """dst[w] = src[src_off] where ok, 0 where only valid; pointers of type UNIT."""
    src = src_addr.to(tl.pointer_type(UNIT))
    dst = dst_addr.to(tl.pointer_type(UNIT))
    v = tl.load(src + src_off, mask=ok, other=0)
    tl.store(dst + w, v, mask=valid)


@triton.jit
def _gather_cache_kernel(
    table_ptr,
    idx_ptr, i_sb, i_sm,
    M, L,
    COLS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Output units [pid(0)*BLOCK, +BLOCK) of tensor t = pid(1), whose table row is (src, dst, W,
    U, H, sB, sH, sL, sU, total). Unit w of the contiguous output [B, H, M, U] is unit
    u = w % U of row r = w // U = (b*H + h)*M + m, copied from
    src + b*sB + h*sH + index[b, m]*sL + u*sU, or 0 where index[b, m] is outside [0, L).
    Counting units, not rows, keeps every lane busy whatever the row length of each tensor
    (tensors of different shapes share the launch); programs past a tensor's end are masked.
    Unit counts are int32 (the launcher checks total < 2^31): 64-bit division is slow on GPUs."""
    meta = table_ptr + tl.program_id(1).to(tl.int64) * COLS
    src_addr = tl.load(meta + 0)
    dst_addr = tl.load(meta + 1)
    W = tl.load(meta + 2)
    U = tl.load(meta + 3).to(tl.int32)
    H = tl.load(meta + 4).to(tl.int32)
    sB = tl.load(meta + 5)
    sH = tl.load(meta + 6)
    sL = tl.load(meta + 7)
    sU = tl.load(meta + 8)
    total = tl.load(meta + 9).to(tl.int32)
    w = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = w < total
    r = w // U
    u = w - r * U
    o = r // M
    m = r - o * M
    b = o // H
    h = o - b * H
    idx = tl.load(idx_ptr + b.to(tl.int64) * i_sb + m.to(tl.int64) * i_sm, mask=valid, other=-1)
    ok = valid & (idx >= 0) & (idx < L)
    src_off = b.to(tl.int64) * sB + h.to(tl.int64) * sH + tl.where(ok, idx, 0) * sL + u.to(tl.int64) * sU
    # W is the same for the whole program (one tensor), so only one branch runs.
    if W == 8:
        _copy_units(src_addr, dst_addr, src_off, w, ok, valid, tl.int64)
    elif W == 4:
        _copy_units(src_addr, dst_addr, src_off, w, ok, valid, tl.int32)
    elif W == 2:
        _copy_units(src_addr, dst_addr, src_off, w, ok, valid, tl.int16)
    else:
        _copy_units(src_addr, dst_addr, src_off, w, ok, valid, tl.int8)


def _middle(t: torch.Tensor):
    """(t or a contiguous copy, H, sH): the dims between batch and sequence as one dim of H rows
    with element stride sH."""
    sizes, strides = t.shape[1:-2], t.stride()[1:-2]
    dims = [(n, s) for n, s in zip(sizes, strides) if n != 1]
    H = 1
    for n, _ in dims:
        H *= n
    if not dims:
        return t, H, 0
    for (n0, s0), (n1, s1) in zip(dims, dims[1:]):
        if s0 != s1 * n1:
            t = t.contiguous()
            return t, H, t.shape[-2] * t.shape[-1]
    return t, H, dims[-1][1]


def _unit_bytes(t: torch.Tensor, sb: int, sh: int, sl: int, out: torch.Tensor):
    """(W, unit stride in units, units per row): the widest unit a row of t can be copied in."""
    es, D, sd = t.element_size(), t.shape[-1], t.stride(-1)
    if D > 1 and sd != 1:  # not contiguous in D: element by element
        return es, sd, D
    row = D * es
    for w in (8, 4, 2, 1):
        if row % w == 0 and t.data_ptr() % w == 0 and out.data_ptr() % w == 0 and \
                all((s * es) % w == 0 for s in (sb, sh, sl)):
            return w, 1, row // w
    return 1, 1, row  # unreachable (w = 1 always fits)


# Host tables captured into CUDA graphs: the graph's copy node reads them at every replay, so
# they must outlive the graph (a handful per captured graph; never freed).
_CAPTURED_TABLES: list = []


def _device_table(rows: list, device: torch.device) -> torch.Tensor:
    host = torch.tensor(rows, dtype=torch.int64)
    if device.type != "cuda":
        return host
    if torch.cuda.is_current_stream_capturing():
        # No pinning inside a capture (it queries events); a non-blocking copy from this
        # pageable buffer is recorded as a graph node, so the buffer is kept alive.
        _CAPTURED_TABLES.append(host)
        return host.to(device, non_blocking=True)
    # Pinned + non-blocking: stream-ordered, no host wait; the caching host allocator keeps the
    # buffer until the copy has run.
    return host.pin_memory().to(device, non_blocking=True)


def gather_cache(tensors, index) -> list:
    """Every tensor [B, ..., L, D] gathered along dim -2 at index [B, M] (-1 = zeros), one launch."""
    B, L, M = V.check_gather_cache(tensors, index)
    if not capturing(index):  # one aminmax, one host wait
        V.check_gather_cache_range(index, L)
    outs, rows = [], []
    sources = []  # keeps contiguous copies (see _middle) alive until the launch has been queued
    with _device_guard(index.device):
        for t in tensors:
            out = torch.empty((*t.shape[:-2], M, t.shape[-1]), dtype=t.dtype, device=t.device)
            outs.append(out)
            if out.numel() == 0:
                continue
            t, H, sh = _middle(t)
            sources.append(t)
            sb = t.stride(0) if t.shape[0] > 1 else 0
            sl = t.stride(-2) if L > 1 else 0
            sh = sh if H > 1 else 0
            w, su, units = _unit_bytes(t, sb, sh, sl, out)
            es = t.element_size()
            total = B * H * M * units
            if total >= 2 ** 31:
                raise ValueError(f"tensors[{len(outs) - 1}] has {total} copy units to write, more than the "
                                 "Triton kernel supports (2^31 - 1)")
            rows.append([t.data_ptr(), out.data_ptr(), w, units, H, sb * es // w, sh * es // w, sl * es // w,
                         su, total])
        if not rows:
            return outs
        most = max(r[_TOTAL] for r in rows)
        cfg = _gather_cache_config(most, _interpreting())
        table = _device_table(rows, index.device)
        grid = (triton.cdiv(most, cfg["BLOCK"]), len(rows))
        _gather_cache_kernel[grid](table, index, index.stride(0), index.stride(1), M, L, COLS=_COLS, **cfg)
    return outs
