"""Triton kernels for the pruning ops: vispruner_select and prumerge (ALGORITHMS.md).

vispruner_select. Host side, all on the device: rank the scores, take the residual tokens (all
but the T_imp best, best first), normalise the features and form their cosine similarities
once, S = Xn Xn^T ([B, N, N], one product per image, reference.vispruner_similarity). Then ONE
program per image runs every duplicate-removal round: with the list L (length R, token positions,
initially the residual tokens best first),

    a = L[0::2], b = L[1::2],   match[i] = max_j S[a_i, b_j],
    L <- [a_i for i in argsort(match, descending, stable)[min(r, |a|):]] + b,   r = min(step, R - T_div)

The list (double-buffered), the per-round maxima and their ranks stay in a few KB of per-image
scratch that the program alone touches (L1/L2-resident; Triton cannot index registers
dynamically), with a barrier between phases. The list lengths do not depend on the data, so
the host knows the number of rounds and nothing waits for the device.

prumerge. Host side, on the device: the IQR counts (sorted scores, numpy's 'linear' quartiles),
the kept lists (k best, then the PruMerge+ samples), the similarity of every kept token to every
token ([K, N] per image, one product per image, reference.prumerge_similarity) and the
pruned-token weights. The only host wait: the kept counts (the output size M = max(kept) + 1
and the per-image product shapes).

The similarities come from the reference's own functions: BLAS rounds differently across
shapes (a subset, batched or matrix-vector product can differ in the last bit), and float64
results must equal the reference's exactly, exact ties included (on CPU tensors, the
interpreter, also bit-identical to the C++ kernels, which make the same ATen calls). Then one program per block of output rows: for each kept token,
the top-knn selection over its similarity row (repeated arg-max, ties to the lower position)
fused with the weighted sum of those rows of x; one more program per image writes the summary
row, the sum of s_j x_j over the pruned tokens.

Accumulation is float32, or float64 for float64 inputs. Block sizes and warps come from the pure
`_*_config` functions, which the compile check (python_tests/test_triton_compile.py) sees
through the real launchers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _validate as V
from .. import reference as ref
from . import _launch

__all__ = ["vispruner_select", "prumerge"]


# --- vispruner_select ---------------------------------------------------------------------------

@triton.jit
def _vispruner_dedup_kernel(S_ptr, stride_sb, stride_sn, L_ptr, stride_lb, M_ptr, stride_mb, R0, n_div, step, n_rounds,
                            BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """All duplicate-removal rounds of one image.

    S: [N, N] similarities (row stride stride_sn); L: two list buffers of R0 int32 each, buffer
    0 holding the residual token positions (best first) on entry; M: (R0 + 1) // 2 scratch for the match scores. After n_rounds the list
    (length T_div) is in buffer n_rounds % 2. Match scores rank high first, equal scores keep
    the lower a-position first; NaN similarities count as -inf (no cosine is -inf).
    """
    b = tl.program_id(0).to(tl.int64)
    S = S_ptr + b * stride_sb
    L = L_ptr + b * stride_lb
    Mb = M_ptr + b * stride_mb
    neg_inf = float("-inf")
    R = R0
    for it in range(n_rounds):
        src = L + (it % 2) * R0
        dst = L + ((it + 1) % 2) * R0
        na = (R + 1) // 2
        nb = R // 2
        drop = tl.minimum(tl.minimum(step, R - n_div), na)  # (fix) never more than |a|
        # Phase 1: match[i] = max_j S[a_i, b_j]
        for a0 in range(0, na, BLOCK_A):
            ia = a0 + tl.arange(0, BLOCK_A)
            am = ia < na
            ta = tl.load(src + 2 * ia, mask=am, other=0)
            best = tl.full([BLOCK_A], neg_inf, S_ptr.dtype.element_ty)
            for b0 in range(0, nb, BLOCK_B):
                jb = b0 + tl.arange(0, BLOCK_B)
                bm = jb < nb
                tb = tl.load(src + 2 * jb + 1, mask=bm, other=0)
                v = tl.load(S + ta[:, None].to(tl.int64) * stride_sn + tb[None, :], mask=am[:, None] & bm[None, :], other=neg_inf)
                v = tl.where(v == v, v, neg_inf)
                best = tl.maximum(best, tl.max(v, axis=1))
            tl.store(Mb + ia, best, mask=am)
        tl.debug_barrier()
        # Phase 2: rank of each a-entry (how many a-entries rank before it); the survivors go to
        # dst[rank - drop], then all b-entries in their order.
        for a0 in range(0, na, BLOCK_A):
            ia = a0 + tl.arange(0, BLOCK_A)
            am = ia < na
            mi = tl.load(Mb + ia, mask=am, other=neg_inf)
            rank = tl.zeros([BLOCK_A], dtype=tl.int32)
            for j0 in range(0, na, BLOCK_B):
                ja = j0 + tl.arange(0, BLOCK_B)
                jm = ja < na
                mj = tl.load(Mb + ja, mask=jm, other=neg_inf)
                before = (mj[None, :] > mi[:, None]) | ((mj[None, :] == mi[:, None]) & (ja[None, :] < ia[:, None]))
                rank += tl.sum((before & jm[None, :]).to(tl.int32), axis=1)
            ta = tl.load(src + 2 * ia, mask=am, other=0)
            tl.store(dst + rank - drop, ta, mask=am & (rank >= drop))
        for b0 in range(0, nb, BLOCK_B):
            jb = b0 + tl.arange(0, BLOCK_B)
            bm = jb < nb
            tb = tl.load(src + 2 * jb + 1, mask=bm, other=0)
            tl.store(dst + (na - drop) + jb, tb, mask=bm)
        tl.debug_barrier()
        R = R - drop


def _dedup_rounds(R0: int, n_div: int, step: int) -> int:
    """Number of duplicate-removal rounds: the list lengths depend only on the sizes."""
    rounds, R = 0, R0
    while n_div > 0:
        r = min(step, R - n_div)
        if r <= 0:
            break
        R -= min(r, (R + 1) // 2)
        rounds += 1
    return rounds


def _vispruner_config(R0: int, interpret: bool) -> dict:
    if interpret:  # big tiles: fewer interpreted loop iterations
        block = min(512, triton.next_power_of_2((R0 + 1) // 2))
        return dict(BLOCK_A=block, BLOCK_B=block, num_warps=4)
    # One CTA per image walks every round: wide b tiles keep many gathers in flight. 32 a-entries
    # per tile, not 64: at 64 the [BLOCK_A, BLOCK_B] compares need ~250 registers per thread and
    # spill on sm_80 (Triton 3.9).
    return dict(BLOCK_A=32, BLOCK_B=128, num_warps=8)


@_launch.on_inputs_device
def vispruner_select(x: torch.Tensor, scores: torch.Tensor, keep: int, important_ratio: float = 0.5,
                     dedup_step: int = 8) -> torch.Tensor:
    B, N, C = V.check_vispruner(x, scores, keep, important_ratio, dedup_step)
    n_imp, n_div = ref.vispruner_counts(keep, important_ratio)
    order = ref.rank_order(scores)
    R0 = N - n_imp
    rounds = _dedup_rounds(R0, n_div, dedup_step)
    if rounds == 0 or B == 0:  # T_div = 0, or no residual token to remove: the keep best
        return order[:, :keep].sort(dim=1).values
    residual = order[:, n_imp:]
    S = ref.vispruner_similarity(x).contiguous()  # [B, N, N], the only products (see the top)
    lists = torch.empty(B, 2, R0, dtype=torch.int32, device=x.device)
    lists[:, 0] = residual.to(torch.int32)
    match = torch.empty(B, (R0 + 1) // 2, dtype=S.dtype, device=x.device)
    _vispruner_dedup_kernel[(B,)](S, S.stride(0), S.stride(1), lists, lists.stride(0), match, match.stride(0), R0, n_div,
                                  dedup_step, rounds, **_vispruner_config(R0, _launch.interpreting()))
    final = lists[:, rounds % 2, :n_div].to(torch.int64)  # token positions
    selected = torch.cat([order[:, :n_imp], final], dim=1)
    return selected.sort(dim=1).values


# --- prumerge -----------------------------------------------------------------------------------

@triton.jit
def _prumerge_rows_kernel(sim_ptr, stride_sb, stride_sk, kept_ptr, stride_kb, nkept_ptr,
                          x_ptr, stride_xb, stride_xn, stride_xd, w_ptr, stride_wb, wsum_ptr, stride_pb,
                          out_ptr, stride_ob, stride_om, N, D, n_near,
                          BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """BLOCK_R output rows of one image, or (last program of the image) its summary row.

    Row i < K (kept token t = kept[i]): out = x_t + sum_{j in near(t)} w_j x_j, near(t) = the
    n_near tokens j != t of highest sim[i, j] (ties: lower j first; NaN lowest). Row K: out =
    sum_j wsum_j x_j (wsum = w on the pruned tokens, 0 elsewhere). Rows > K stay zero (padding).
    """
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    K = tl.load(nkept_ptr + b)
    acc_ty = w_ptr.dtype.element_ty
    xb = x_ptr + b * stride_xb
    ob = out_ptr + b * stride_ob
    dr = tl.arange(0, BLOCK_D)
    if blk < tl.num_programs(1) - 1:
        rows = blk * BLOCK_R + tl.arange(0, BLOCK_R)
        rv = rows < K
        t = tl.load(kept_ptr + b * stride_kb + rows, mask=rv, other=0)
        offs = tl.arange(0, BLOCK_N)
        cand = rv[:, None] & (offs[None, :] < N) & (offs[None, :] != t[:, None])
        # Non-candidates and taken tokens are -inf; a NaN similarity becomes -2, below every
        # cosine (|cos| <= 1 + rounding) but above -inf: still a candidate, ranked last.
        v = tl.load(sim_ptr + b * stride_sb + rows[:, None] * stride_sk + offs[None, :], mask=cand,
                    other=float("-inf"))
        v = tl.where(v == v, v, -2.0)
        ks = tl.arange(0, BLOCK_K)
        sel = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.int32)
        for n in range(n_near):  # repeated arg-max: highest similarity, then lowest position
            m = tl.max(v, axis=1)
            p = tl.min(tl.where(v == m[:, None], offs[None, :], BLOCK_N), axis=1)
            sel = tl.where(ks[None, :] == n, p[:, None], sel)
            v = tl.where(offs[None, :] == p[:, None], float("-inf"), v)
        sm = rv[:, None] & (ks[None, :] < n_near)
        w = tl.load(w_ptr + b * stride_wb + sel, mask=sm, other=0.0)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + dr
            dm = dd < D
            xs = tl.load(xb + sel[:, :, None] * stride_xn + dd[None, None, :] * stride_xd,
                         mask=sm[:, :, None] & dm[None, None, :], other=0.0).to(acc_ty)
            xt = tl.load(xb + t[:, None] * stride_xn + dd[None, :] * stride_xd, mask=rv[:, None] & dm[None, :],
                         other=0.0).to(acc_ty)
            res = xt + tl.sum(xs * w[:, :, None], axis=1)
            tl.store(ob + rows[:, None] * stride_om + dd[None, :], res.to(out_ptr.dtype.element_ty),
                     mask=rv[:, None] & dm[None, :])
    else:
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + dr
            dm = dd < D
            acc = tl.zeros([BLOCK_D], dtype=acc_ty)
            for n0 in range(0, N, BLOCK_S):
                nn = n0 + tl.arange(0, BLOCK_S)
                nm = nn < N
                ws = tl.load(wsum_ptr + b * stride_pb + nn, mask=nm, other=0.0)
                xs = tl.load(xb + nn[:, None] * stride_xn + dd[None, :] * stride_xd, mask=nm[:, None] & dm[None, :],
                             other=0.0).to(acc_ty)
                acc += tl.sum(xs * ws[:, None], axis=0)
            tl.store(ob + K * stride_om + dd, acc.to(out_ptr.dtype.element_ty), mask=dm)


def _iqr_upper_bounds(s: torch.Tensor) -> torch.Tensor:
    """Q3 + 1.5 IQR of each row of s [R, n] (numpy 'linear' quartiles, in s's dtype); NaN for a
    row holding a NaN. The same scalar steps as reference.iqr_upper_bound, vectorised."""
    v = s.sort(dim=1).values
    n = v.shape[1]

    def percentile(q):
        h = (n - 1) * q
        lo = int(h)
        t = h - lo
        a, b = v[:, lo], v[:, min(lo + 1, n - 1)]
        d = b - a
        return a + d * t if t < 0.5 else b - d * (1 - t)

    q1, q3 = percentile(0.25), percentile(0.75)
    bound = q3 + 1.5 * (q3 - q1)
    return torch.where(torch.isnan(s).any(dim=1), torch.full_like(bound, float("nan")), bound)


def _outlier_counts(scores: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """[B] int64 on the device: IQR upper outliers per image (or pooled: n_outliers // B), >= 1."""
    s = scores.to(ref.acc_dtype(scores.dtype))
    B = s.shape[0]
    if per_sample:
        counts = (s > _iqr_upper_bounds(s)[:, None]).sum(dim=1)
    else:
        total = (s > _iqr_upper_bounds(s.reshape(1, -1))).sum()
        counts = (total // B).expand(B)
    return counts.clamp_min(1)


def _prumerge_config(N: int, D: int, KM: int, n_near: int, interpret: bool) -> dict:
    """KM: the most tokens any image keeps (only the interpreter's tiles depend on it)."""
    block_n = triton.next_power_of_2(N)
    block_k = max(2, triton.next_power_of_2(max(n_near, 1)))
    if interpret:  # whole images per program: fewer interpreted steps
        block_r = min(64, triton.next_power_of_2(KM))
        block_d = max(2, min(triton.next_power_of_2(D), (1 << 20) // (block_r * block_k)))
        block_s = min(1024, block_n)
    else:  # ~4K-element register tiles
        block_r = max(1, 4096 // block_n)
        block_d = max(2, min(triton.next_power_of_2(D), 4096 // (block_r * block_k)))
        block_s = max(2, 4096 // block_d)
    return dict(BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, BLOCK_S=block_s,
                num_warps=8)


@_launch.on_inputs_device
def prumerge(x: torch.Tensor, keys: torch.Tensor, scores: torch.Tensor, knn: int = 32, plus: bool = False,
             per_sample: bool = True):
    B, N, D, Ck = V.check_prumerge(x, keys, scores, knn, plus, per_sample)
    dev = x.device
    if _launch.capturing(scores):
        # Refused before anything is captured: the host wait below would break the capture.
        raise RuntimeError("prumerge cannot be captured in a CUDA graph: its output size (the kept "
                           "token count) depends on the scores and needs a host wait")
    if B == 0:  # M = 2, the fake kernel's minimum (a kept token + the summary)
        return x.new_zeros((0, 2, D)), torch.empty(0, dtype=torch.int64, device=dev)
    counts = _outlier_counts(scores, per_sample)
    order = ref.rank_order(scores)
    pos = torch.arange(N, device=dev)
    rank = torch.empty_like(order).scatter_(1, order, pos.expand(B, N))
    kept_mask = rank < counts[:, None]
    if plus:
        stride = ((N // counts) // 3).clamp_min(1)  # (fix) the max
        samples = (pos % stride[:, None] == 0) & (pos < N - 1) & ~kept_mask
    else:
        samples = torch.zeros_like(kept_mask)
    n_kept = counts + samples.sum(dim=1)
    lengths = n_kept + 1
    nk = n_kept.tolist()  # the one wait for the device: the output size and the product shapes
    KM = max(nk)
    M = KM + 1
    col = torch.arange(KM, device=dev).expand(B, KM)
    sample_pos = torch.where(samples, pos, N).sort(dim=1).values  # samples ascending, then N
    kept = torch.where(col < counts[:, None], order.gather(1, col.clamp(max=N - 1)),
                       sample_pos.gather(1, (col - counts[:, None]).clamp(0, N - 1)))
    kept = torch.where(col < n_kept[:, None], kept, 0).contiguous()

    acc = ref.acc_dtype(x.dtype)
    w = scores.to(ref.acc_dtype(scores.dtype)).to(acc).contiguous()  # raw scores as weights
    wsum = torch.where(kept_mask | samples, 0.0, w).contiguous()
    kn = ref.l2_normalize(keys.to(ref.acc_dtype(keys.dtype)))
    sim = kn.new_zeros((B, KM, N))  # rows past an image's kept count: padding, never read
    for b in range(B):  # one product per image, as the reference (see the top)
        sim[b, :nk[b]] = ref.prumerge_similarity(kn[b], kept[b, :nk[b]])
    out = torch.zeros(B, M, D, dtype=x.dtype, device=dev)
    n_near = min(knn, N - 1)  # fewer candidates than knn: all of them
    cfg = _prumerge_config(N, D, KM, n_near, _launch.interpreting())
    grid = (B, triton.cdiv(KM, cfg["BLOCK_R"]) + 1)  # + one program per image for the summary row
    _prumerge_rows_kernel[grid](sim, sim.stride(0), sim.stride(1), kept, kept.stride(0), n_kept.contiguous(),
                                x, x.stride(0), x.stride(1), x.stride(2), w, w.stride(0), wsum, wsum.stride(0),
                                out, out.stride(0), out.stride(1), N, D, n_near, **cfg)
    return out, lengths
