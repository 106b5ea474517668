"""vispruner_select and prumerge on every backend against vtkernels.reference.

Backends: "cpu" (the C++ kernels through the dispatcher), "triton" (the launchers called
directly: under TRITON_INTERPRET=1 on CPU tensors without a GPU, else on CUDA) and "cuda" (the
dispatcher on CUDA tensors; GPU only). Float64 is the exactness mode: the same indices and
tokens as the reference. Float32 may resolve near-ties differently (SPEC.md), so it is held to
the important tokens exactly, an 80% average overlap of the diverse ones, and PruMerge tokens
within 1e-4 except where the knn-th neighbour is a near-tie.
"""
import os

if "TRITON_INTERPRET" not in os.environ:  # before any Triton kernel is defined
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import vtkernels  # noqa: F401  (registers the ops)
from vtkernels import ops
from vtkernels import reference as ref

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")
CUDA = torch.cuda.is_available()
try:
    from vtkernels.triton import prune as TP
except Exception:  # pragma: no cover - no triton: the triton backend is skipped
    TP = None

BACKENDS = ["cpu", "triton"] + (["cuda"] if CUDA else [])
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def backend(name):
    """(vispruner_select, prumerge, device) of a backend."""
    if name == "cpu":
        return ops.vispruner_select, ops.prumerge, "cpu"
    if name == "cuda":
        return ops.vispruner_select, ops.prumerge, "cuda"
    if TP is None or (not INTERPRET and not CUDA):
        pytest.skip("no Triton backend here")
    if INTERPRET and type(TP._vispruner_dedup_kernel).__name__ != "InterpretedFunction":
        pytest.skip("vtkernels.triton was imported before TRITON_INTERPRET=1 was set")
    return TP.vispruner_select, TP.prumerge, "cpu" if INTERPRET else "cuda"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def features(B, N, C, seed, dtype=torch.float64, rank=8, noise=0.5):
    """Low-rank structure plus noise: clear near-duplicates, like neighbouring image patches."""
    g = _gen(seed)
    base = torch.randn(B, N, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, C, generator=g, dtype=torch.float64)
    return (base + noise * torch.randn(B, N, C, generator=g, dtype=torch.float64)).to(dtype)


def attention_like(B, N, seed, dtype=torch.float64, spread=0.7):
    """Softmax of Gaussian logits: a CLS-attention-like row with a few dozen IQR outliers at N = 576."""
    return torch.softmax(torch.randn(B, N, generator=_gen(seed), dtype=torch.float64) * spread, dim=-1).to(dtype)


def to(device, *ts):
    return [t.to(device) for t in ts]


# --- vispruner_select -----------------------------------------------------------------------------

# (B, N, C, keep, important_ratio, dedup_step)
VIS_CASES = [
    (2, 36, 16, 12, 0.5, 8),     # even important count
    (3, 50, 24, 9, 0.34, 8),     # T_imp = 3: odd residual list from the first round
    (2, 49, 8, 7, 0.5, 8),       # T_imp = 3, odd N
    (2, 40, 8, 10, 0.0, 8),      # ratio 0: all diverse
    (2, 40, 8, 10, 1.0, 8),      # ratio 1: all important
    (2, 40, 8, 1, 0.5, 8),       # keep = 1 (T_imp = 0)
    (2, 40, 8, 40, 0.5, 8),      # keep = N
    (1, 1, 4, 1, 0.5, 8),        # a single token
    (2, 64, 16, 20, 0.5, 1),     # one per round
    (2, 64, 16, 20, 0.5, 5),
    (2, 576, 64, 64, 0.5, 8),    # LLaVA-1.5 token count
    (1, 2880, 16, 2560, 0.5, 8),  # LLaVA-NeXT token count (few rounds: the interpreter is slow)
]


def check_indices(idx, B, keep, N):
    assert idx.dtype == torch.int64 and idx.shape == (B, keep)
    assert bool((idx >= 0).all()) and bool((idx < N).all())
    assert bool((idx[:, 1:] > idx[:, :-1]).all()), "indices must be ascending and unique"


@pytest.mark.parametrize("case", VIS_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("bk", BACKENDS)
def test_vispruner_float64_exact(bk, case):
    vis, _, dev = backend(bk)
    B, N, C, keep, ratio, step = case
    x = features(B, N, C, seed=N + keep)
    s = attention_like(B, N, seed=N + C)
    want = ref.vispruner_select(x, s, keep, ratio, step)
    got = vis(*to(dev, x, s), keep, ratio, step).cpu()
    check_indices(got, B, keep, N)
    assert torch.equal(got, want)


@pytest.mark.parametrize("bk", BACKENDS)
def test_vispruner_noncontiguous(bk):
    vis, _, dev = backend(bk)
    # non-contiguous x (a transposed buffer) and scores (a strided view)
    x = features(2, 48, 20, seed=5).transpose(1, 2).contiguous().transpose(1, 2)
    s = attention_like(2, 96, seed=6)[:, ::2]
    want = ref.vispruner_select(x, s, 14, 0.5, 8)
    assert torch.equal(vis(*to(dev, x, s), 14, 0.5, 8).cpu(), want)


def test_vispruner_llava_next_default_rounds():
    # N = 2880 with the default budget (320 rounds): the C++ kernel only (too slow interpreted)
    x = features(1, 2880, 32, seed=7)
    s = attention_like(1, 2880, seed=8)
    assert torch.equal(ops.vispruner_select(x, s, 320), ref.vispruner_select(x, s, 320))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bk", ["cpu"] + (["cuda"] if CUDA else []))
def test_vispruner_low_precision(bk, dtype):
    vis, _, dev = backend(bk)
    # LLaVA-1.5 sizes. One flipped comparison (two match scores within float32 rounding) changes
    # the rest of the rounds for that image, so the overlap is an average over many images.
    B, N, C, keep, ratio = 32, 576, 1024, 64, 0.5
    x = features(B, N, C, seed=11, dtype=dtype, noise=2.0)
    s = attention_like(B, N, seed=12, dtype=torch.float32)
    got = vis(*to(dev, x, s), keep, ratio).cpu()
    check_indices(got, B, keep, N)
    # The float64 choice on the same values, from the C++ kernel: the exact tests above show it
    # equals the reference (which is slow at this batch).
    want = ops.vispruner_select(x.double().cpu(), s.double().cpu(), keep, ratio)
    n_imp, n_div = ref.vispruner_counts(keep, ratio)
    important = ref.rank_order(s)[:, :n_imp]
    overlap = []
    for b in range(B):
        g, w, imp = set(got[b].tolist()), set(want[b].tolist()), set(important[b].tolist())
        assert imp <= g, "important tokens must match exactly"
        overlap.append(len((g - imp) & (w - imp)) / n_div)
    assert sum(overlap) / B >= 0.8, overlap


def test_vispruner_triton_float32_matches_cpu():
    # On CPU tensors the Triton launcher forms S with the same ATen calls as the C++ kernel, so
    # float32 results are identical, flips included.
    if not INTERPRET:
        pytest.skip("interpreter only: on a GPU the float32 products differ from the CPU's")
    vis, _, dev = backend("triton")
    x = features(3, 576, 256, seed=17, dtype=torch.float32, noise=2.0)
    s = attention_like(3, 576, seed=18, dtype=torch.float32)
    assert torch.equal(vis(x, s, 64), ops.vispruner_select(x, s, 64))


def published_vispruner(x, s, T, ratio=0.5):
    """The published loop (Zhang et al.), valid where it does not crash (even counts)."""
    B = x.shape[0]
    n_imp = int(T * ratio)
    order = s.argsort(dim=-1, descending=True)
    important, residual = order[:, :n_imp], order[:, n_imp:]
    xn = x / x.norm(dim=-1, keepdim=True)
    rows = torch.arange(B)[:, None]
    while True:
        R = residual.shape[1]
        r = min(8, R - (T - n_imp))
        if r <= 0:
            break
        t = xn[rows.expand(-1, R), residual]
        match = (t[:, ::2] @ t[:, 1::2].transpose(-1, -2)).max(dim=-1).values
        distinct = match.argsort(dim=-1, descending=True)[:, r:]
        residual = torch.cat([residual[:, ::2][rows.expand(-1, R // 2 - r), distinct], residual[:, 1::2]], dim=-1)
    return torch.cat([important, residual], dim=1).sort(dim=1).values


def test_vispruner_reference_matches_published_code():
    x = features(3, 144, 32, seed=13)
    s = attention_like(3, 144, seed=14)
    for T in (16, 32, 64):
        assert torch.equal(ref.vispruner_select(x, s, T), published_vispruner(x, s, T))


@pytest.mark.parametrize("bk", BACKENDS)
def test_vispruner_nonfinite(bk):
    vis, _, dev = backend(bk)
    x = features(2, 40, 8, seed=15)
    x[0, 3] = float("nan")
    x[1, 5] = 0.0  # a zero feature: normalised to zero, no NaN
    s = attention_like(2, 40, seed=16, dtype=torch.float32)
    s[0, :6] = float("nan")
    s[1, 2], s[1, 9] = float("inf"), -float("inf")
    got = vis(*to(dev, x, s), 20, 0.3).cpu()
    check_indices(got, 2, 20, 40)
    assert torch.equal(got, ref.vispruner_select(x, s, 20, 0.3))


# --- prumerge -------------------------------------------------------------------------------------

def spiky_scores(B, N, spikes, seed, dtype=torch.float64):
    """Scores in [0.4, 0.6] with spikes[b] clear outliers in image b (so every image its own count)."""
    g = _gen(seed)
    s = 0.4 + 0.2 * torch.rand(B, N, generator=g, dtype=torch.float64)
    for b, n in enumerate(spikes):
        pos = torch.randperm(N, generator=g)[:n]
        s[b, pos] = 5.0 + torch.rand(n, generator=g, dtype=torch.float64)
    return s.to(dtype)


def check_prumerge(got, want):
    (gt, gl), (wt, wl) = got, want
    assert gl.dtype == torch.int64 and torch.equal(gl.cpu(), wl)
    assert gt.dtype == wt.dtype and gt.shape == wt.shape
    for b, n in enumerate(wl.tolist()):
        assert not gt[b, n:].any(), "padding must be zeros"
    assert_close(gt.cpu(), wt, atol=1e-9, rtol=1e-9)


# (B, N, D, Ck, knn, plus, per_sample, scores)
PM_CASES = [
    (2, 64, 16, 8, 32, False, True, "attention"),
    (2, 64, 16, 8, 32, True, True, "attention"),
    (3, 64, 16, 8, 32, False, False, "attention"),    # pooled over the batch, as published
    (3, 64, 16, 8, 32, True, False, "attention"),
    (4, 60, 8, 8, 32, True, True, "spiky"),           # every image a different count
    (2, 20, 8, 4, 32, False, True, "spiky"),          # fewer than 32 candidates
    (2, 20, 8, 4, 1, True, True, "attention"),        # knn = 1
    (2, 30, 8, 4, 32, True, True, "constant"),        # no outlier: keep the single best (fix)
    (2, 30, 8, 4, 5, True, True, "linspace"),         # no outlier either
    (1, 1, 4, 4, 32, True, True, "attention"),        # one token: nothing to merge, empty summary
    (2, 576, 32, 16, 32, False, True, "attention"),   # LLaVA-1.5 token count
    (1, 2880, 8, 8, 32, False, True, "attention"),    # LLaVA-NeXT token count
]


def pm_scores(kind, B, N, seed):
    if kind == "attention":
        return attention_like(B, N, seed)
    if kind == "spiky":
        return spiky_scores(B, N, [3 * (b + 1) for b in range(B)], seed)
    if kind == "constant":
        return torch.full((B, N), 1.0 / N, dtype=torch.float64)
    return torch.linspace(0, 1, N, dtype=torch.float64).repeat(B, 1)


@pytest.mark.parametrize("case", PM_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("bk", BACKENDS)
def test_prumerge_float64_exact(bk, case):
    _, pm, dev = backend(bk)
    B, N, D, Ck, knn, plus, per_sample, kind = case
    x = features(B, N, D, seed=N + D)
    keys = features(B, N, Ck, seed=N + Ck + 1)
    s = pm_scores(kind, B, N, seed=N + 3)
    want = ref.prumerge(x, keys, s, knn, plus, per_sample)
    check_prumerge(pm(*to(dev, x, keys, s), knn, plus, per_sample), want)
    if kind == "spiky" and N >= 60:  # spikes well under a quarter of the tokens: all outliers
        assert ref.prumerge_counts(s) == [3 * (b + 1) for b in range(B)]
    if kind in ("constant", "linspace"):
        assert want[1].tolist()[0] == 2 or plus


@pytest.mark.parametrize("bk", BACKENDS)
def test_prumerge_noncontiguous_half(bk):
    _, pm, dev = backend(bk)
    x = features(2, 40, 12, seed=21).transpose(1, 2).contiguous().transpose(1, 2)
    keys = features(2, 40, 24, seed=22)[:, :, ::2]
    s = attention_like(2, 40, seed=23, dtype=torch.float32)
    want = ref.prumerge(x, keys, s, 8, True)
    check_prumerge(pm(*to(dev, x, keys, s), 8, True), want)
    if bk == "triton" and INTERPRET:
        return  # the interpreter does not model half precision faithfully
    got_t, got_l = pm(*to(dev, x.half(), keys.half(), s), 8, True)
    want_t, want_l = ref.prumerge(x.half(), keys.half(), s, 8, True)
    assert got_t.dtype == torch.float16 and torch.equal(got_l.cpu(), want_l)
    assert_close(got_t.cpu(), want_t, atol=2e-3, rtol=2e-3)


def test_prumerge_counts_match_numpy():
    s = attention_like(6, 576, seed=31)
    for b in range(6):
        v = s[b].numpy()
        q1, q3 = np.percentile(v, 25), np.percentile(v, 75)
        assert ref.prumerge_counts(s[b:b + 1])[0] == max(1, int((v > q3 + 1.5 * (q3 - q1)).sum()))
    v = s.numpy().ravel()
    q1, q3 = np.percentile(v, 25), np.percentile(v, 75)
    assert ref.prumerge_counts(s, per_sample=False) == [max(1, int((v > q3 + 1.5 * (q3 - q1)).sum()) // 6)] * 6


def published_prumerge(x, keys, s):
    """The published PruMerge (plain) at batch 1: Python loop over kept tokens."""
    N = x.shape[1]
    v = s.numpy().ravel()
    q1, q3 = np.percentile(v, 25), np.percentile(v, 75)
    k = int(N * (len(np.where(v > q3 + 1.5 * (q3 - q1))[0]) / N))
    idx = torch.topk(s, k, dim=1).indices[0]
    rest = torch.tensor([j for j in range(N) if j not in set(idx.tolist())])
    kn = torch.nn.functional.normalize(keys[0], dim=-1)
    out = []
    for i in range(k):
        others = torch.cat([idx[:i], idx[i + 1:], rest])
        near = others[torch.topk(kn[others] @ kn[idx[i]], 32).indices]
        out.append(x[0, idx[i]] + (s[0, near, None] * x[0, near]).sum(0))
    out.append((s[0, rest, None] * x[0, rest]).sum(0))
    return torch.stack(out)[None]


def test_prumerge_reference_matches_published_code():
    x, keys = features(1, 144, 16, seed=41), features(1, 144, 8, seed=42)
    s = attention_like(1, 144, seed=43)
    tok, n = ref.prumerge(x, keys, s)
    assert_close(tok, published_prumerge(x, keys, s), atol=1e-12, rtol=1e-12)


def near_tie_rows(keys, kept_rows, knn, tol=1e-5):
    """Kept tokens whose knn-th and (knn+1)-th nearest similarities (float64) lie within tol."""
    kn = ref.l2_normalize(keys.double())
    ties = set()
    for b, rows in enumerate(kept_rows):
        for i, t in enumerate(rows):
            sim = kn[b] @ kn[b, t]
            sim[t] = -float("inf")
            top = sim.topk(min(knn + 1, sim.numel())).values
            if top.numel() > knn and float(top[knn - 1] - top[knn]) < tol:
                ties.add((b, i))
    return ties


@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("bk", BACKENDS)
def test_prumerge_float32(bk, plus):
    _, pm, dev = backend(bk)
    B, N, D, Ck = 3, 576, 32, 64
    x = features(B, N, D, seed=51, dtype=torch.float32)
    keys = features(B, N, Ck, seed=52, dtype=torch.float32)
    s = attention_like(B, N, seed=53, dtype=torch.float32)
    tok, lengths = pm(*to(dev, x, keys, s), 32, plus)
    want_t, want_l = ref.prumerge(x.double(), keys.double(), s.double(), 32, plus)
    assert torch.equal(lengths.cpu(), want_l)
    err = (tok.cpu().double() - want_t).abs().amax(dim=2)
    order = ref.rank_order(s)
    kept = []
    for b, n in enumerate(want_l.tolist()):
        rows = order[b, :ref.prumerge_counts(s[b:b + 1])[0]].tolist()
        if plus:
            rows += ref.prumerge_samples(N, len(rows), rows)
        kept.append(rows)
    bad = {(b, i) for b, i in (err > 1e-4).nonzero().tolist()}
    assert bad <= near_tie_rows(keys, kept, 32), bad
    assert len(bad) <= 0.02 * int(want_l.sum())


@pytest.mark.parametrize("bk", BACKENDS)
def test_prumerge_nonfinite(bk):
    _, pm, dev = backend(bk)
    x = features(2, 40, 8, seed=61)
    keys = features(2, 40, 8, seed=62)
    keys[0, 4] = float("nan")
    keys[1, 6] = 0.0
    s = attention_like(2, 40, seed=63, dtype=torch.float32)
    s[1, 3] = float("nan")  # a NaN score: no quartiles, so the single best token (fix)
    s[0, 7] = float("inf")
    tok, lengths = pm(*to(dev, x, keys, s), 6, True)
    want_t, want_l = ref.prumerge(x, keys, s, 6, True)
    assert torch.equal(lengths.cpu(), want_l)
    # compare the NaN pattern too: equal_nan
    assert_close(tok.cpu(), want_t, atol=1e-9, rtol=1e-9, equal_nan=True)


# --- regressions: empty batch, exact float64 ties -------------------------------------------------

def _impls(bk):
    """(vispruner_select, prumerge, device) of a backend, or of the reference ("ref")."""
    return (ref.vispruner_select, ref.prumerge, "cpu") if bk == "ref" else backend(bk)


@pytest.mark.parametrize("bk", ["ref"] + BACKENDS)
def test_empty_batch(bk):
    """B = 0 used to crash the process (C++ pooled count read v[0] of an empty vector and divided
    by B) and failed in the reference and the Triton launcher. Now: no rows, M = 2 (the fake
    kernel's minimum size), empty int64 lengths; empty int64 indices for vispruner."""
    vis, pm, dev = _impls(bk)
    x, keys, s = to(dev, torch.randn(0, 9, 4), torch.randn(0, 9, 3), torch.randn(0, 9))
    for per_sample in (False, True):
        for plus in (False, True):
            tok, lengths = pm(x, keys, s, 32, plus, per_sample)
            assert tok.shape == (0, 2, 4) and tok.dtype == x.dtype
            assert lengths.shape == (0,) and lengths.dtype == torch.int64
    for ratio in (0.0, 0.5, 1.0):
        idx = vis(x.double(), s, 3, ratio, 8)
        assert idx.shape == (0, 3) and idx.dtype == torch.int64


def _oracle(dev, fn, *args):
    """The reference on the backend's device, back on the CPU. The exact-tie tests compare with it
    because float64 exactness is per device: every backend forms its similarities with the
    reference's ATen calls, and on CUDA those run on cuBLAS, which may round a product differently
    from the CPU's BLAS (an exact 0 against -2.2e-17 decides an exact tie)."""
    out = fn(*to(dev, *args[:-1]), *args[-1])
    return tuple(t.cpu() for t in out) if isinstance(out, tuple) else out.cpu()


@pytest.mark.parametrize("bk", BACKENDS)
def test_prumerge_float64_tied_cosines(bk):
    """Exactly tied cosines: keys 1 and 2 are equally close to key 0 (cos = 0.7071...). The
    similarity must be the product of normalised rows on every backend (the C++ kernel divided a
    raw-key product by the norm afterwards, rounded differently and merged token 2)."""
    _, pm, dev = backend(bk)
    keys = torch.tensor([[[3, 1], [0.7, 1.4], [3, 6], [-1, 0]]], dtype=torch.float64)
    x = torch.eye(4, dtype=torch.float64)[None]
    s = torch.tensor([[1, .1, .1, .1]], dtype=torch.float64)
    cpu = ref.prumerge(x, keys, s, 1, False, True)
    assert torch.equal(cpu[0][0, 0], torch.tensor([1, .1, 0, 0], dtype=torch.float64))  # merges token 1
    want = _oracle(dev, ref.prumerge, x, keys, s, (1, False, True))
    tok, lengths = pm(*to(dev, x, keys, s), 1, False, True)
    assert torch.equal(lengths.cpu(), want[1]) and torch.equal(tok.cpu(), want[0])


def _exact_cosines(x):
    """Cosine similarities of integer features [1, N, C], each rounded once from its exact value."""
    from fractions import Fraction
    import math
    rows = x[0].long().tolist()
    S = torch.zeros(1, len(rows), len(rows), dtype=torch.float64)
    for i, u in enumerate(rows):
        for j, v in enumerate(rows):
            dot = sum(a * b for a, b in zip(u, v))
            norm2 = sum(a * a for a in u) * sum(b * b for b in v)
            if dot and norm2:
                S[0, i, j] = math.copysign(math.sqrt(Fraction(dot * dot, norm2)), dot)
    return S


@pytest.mark.parametrize("bk", BACKENDS)
def test_vispruner_float64_exact_ties(bk, monkeypatch):
    """Orthogonal / duplicated integer features: a subset product (C++, Triton) rounded a 0 to
    -2.2e-17 where the reference's full product gave an exact 0. Every backend now forms the
    same batched product (reference.vispruner_similarity)."""
    vis, _, dev = backend(bk)
    x = torch.tensor([[0, 1], [-1, 0], [-1, -1], [-1, 0], [0, -1], [0, 1], [1, 0], [-1, 1], [1, 0], [0, -1],
                      [1, 1], [1, 0]], dtype=torch.float64)[None]
    s = torch.tensor([[2, 1, 0, 1, 2, 0, 2, 2, 2, 1, 2, 2]], dtype=torch.float64)
    # The case turns on rounding: the exactly rounded cosines (orthogonal rows give 0) select
    # [3, 10]; the -2.2e-17 of a per-image gemm for rows 2 and 7 selects [2, 6].
    with monkeypatch.context() as m:
        m.setattr(ref, "vispruner_similarity", lambda t: _exact_cosines(x).to(t.device))
        assert ref.vispruner_select(x, s, 2, 0.0, 1).tolist() == [[3, 10]]
    if dev == "cpu":  # the CPU's batched product rounds these rows exactly
        assert ref.vispruner_select(x, s, 2, 0.0, 1).tolist() == [[3, 10]]
    want = _oracle(dev, ref.vispruner_select, x, s, (2, 0.0, 1))
    assert torch.equal(vis(*to(dev, x, s), 2, 0.0, 1).cpu(), want)


@pytest.mark.parametrize("bk", BACKENDS)
def test_float64_exact_ties_random(bk):
    """Integer-valued, heavily duplicated features and keys (exact ties everywhere) and dyadic
    scores (exact sums): float64 results equal the reference's (on the same device) bit for bit."""
    vis, pm, dev = backend(bk)
    f64 = torch.float64
    for seed in range(40):  # a few hundred such cases were checked by hand
        g = _gen(1000 + seed)
        B, N, C = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(2, 40, (1,), generator=g)), \
            int(torch.randint(1, 5, (1,), generator=g))
        x = torch.randint(-2, 3, (B, N, C), generator=g).to(f64)
        s = torch.randint(0, 3, (B, N), generator=g).to(f64)
        keep = int(torch.randint(1, N + 1, (1,), generator=g))
        ratio, step = (0.0, 0.25, 0.5)[seed % 3], (1, 2, 8)[seed // 3 % 3]
        want = _oracle(dev, ref.vispruner_select, x, s, (keep, ratio, step))
        assert torch.equal(vis(*to(dev, x, s), keep, ratio, step).cpu(), want), seed
        keys = torch.randint(-2, 3, (B, N, C), generator=g).to(f64)
        w = torch.randint(0, 9, (B, N), generator=g).to(f64) / 8
        knn, plus, per_sample = int(torch.randint(1, 6, (1,), generator=g)), bool(seed % 2), bool(seed // 2 % 2)
        want_t, want_l = _oracle(dev, ref.prumerge, x, keys, w, (knn, plus, per_sample))
        tok, lengths = pm(*to(dev, x, keys, w), knn, plus, per_sample)
        assert torch.equal(lengths.cpu(), want_l) and torch.equal(tok.cpu(), want_t), seed


@pytest.mark.parametrize("bk", BACKENDS)
def test_vispruner_batch_independent(bk):
    """An image's selection does not depend on the rest of the batch: the similarities are one
    batched product, and each image is its own matrix of it (float64, exact)."""
    vis, _, dev = backend(bk)
    x = features(5, 576, 64, seed=91)
    s = attention_like(5, 576, seed=92)
    got = vis(*to(dev, x, s), 64).cpu()
    for b in range(5):
        assert torch.equal(vis(*to(dev, x[b:b + 1], s[b:b + 1]), 64).cpu(), got[b:b + 1]), b
    assert torch.equal(vis(*to(dev, x[1:4], s[1:4]), 64).cpu(), got[1:4])


# --- registration, fakes, errors ------------------------------------------------------------------

def test_opcheck_vispruner():
    x, s = features(2, 36, 8, seed=71, dtype=torch.float32), attention_like(2, 36, seed=72, dtype=torch.float32)
    torch.library.opcheck(torch.ops.vtk.vispruner_select.default, (x, s, 9), {"important_ratio": 0.34})
    torch.library.opcheck(torch.ops.vtk.vispruner_select.default, (x.double(), s, 5, 0.5, 2))


def test_opcheck_prumerge_dynamic_size():
    x, keys = features(2, 36, 8, seed=73, dtype=torch.float32), features(2, 36, 4, seed=74, dtype=torch.float32)
    s = spiky_scores(2, 36, [2, 5], seed=75, dtype=torch.float32)
    torch.library.opcheck(torch.ops.vtk.prumerge.default, (x, keys, s), {"knn": 4, "plus": True})
    torch.library.opcheck(torch.ops.vtk.prumerge.default, (x.double(), keys.double(), s.double(), 32, False, False))


def test_fake_prumerge_size_is_dynamic():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        x, keys, s = mode.from_tensor(torch.randn(2, 36, 8)), mode.from_tensor(torch.randn(2, 36, 4)), \
            mode.from_tensor(torch.rand(2, 36))
        tok, lengths = torch.ops.vtk.prumerge(x, keys, s)
        idx = torch.ops.vtk.vispruner_select(x, s, 9)
    assert isinstance(tok.shape[1], torch.SymInt) and tok.shape[0] == 2 and tok.shape[2] == 8
    assert lengths.shape == (2,) and lengths.dtype == torch.int64
    assert idx.shape == (2, 9) and idx.dtype == torch.int64


def test_torch_compile_prumerge():
    def f(x, keys, s):
        tok, n = ops.prumerge(x, keys, s, 4, True)
        return tok * 2, n, ops.vispruner_select(x, s, 6)

    x, keys = features(2, 36, 8, seed=76, dtype=torch.float32), features(2, 36, 4, seed=77, dtype=torch.float32)
    s = spiky_scores(2, 36, [2, 5], seed=78, dtype=torch.float32)
    got = torch.compile(f, backend="aot_eager")(x, keys, s)
    want = f(x, keys, s)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def _vis_calls():
    x, s = torch.randn(2, 10, 4), torch.rand(2, 10)
    return [
        ((x[0], s, 3), "x must be [B, N, D]"),
        ((x, s[0], 3), "scores must be [B, N]"),
        ((x[:1], s, 3), "x has batch 1"),
        ((x[:, :9], s, 3), "x has 9 tokens"),
        ((x, s, 0), "keep=0"),
        ((x, s, 11), "keep=11"),
        ((x, s, 3, 1.5), "important_ratio"),
        ((x, s, 3, -0.1), "important_ratio"),
        ((x, s, 3, float("nan")), "important_ratio"),
        ((x, s, 3, 0.5, 0), "dedup_step"),
        ((x.long(), s, 3), "x must be a floating-point"),
        ((x, s.long(), 3), "scores must be a floating-point"),
    ]


def _pm_calls():
    x, k, s = torch.randn(2, 10, 4), torch.randn(2, 10, 3), torch.rand(2, 10)
    return [
        ((x[0], k, s), "x must be [B, N, D]"),
        ((x, k[0], s), "keys must be [B, N, D]"),
        ((x, k[:1], s), "keys has batch 1"),
        ((x, k[:, :9], s), "keys has 9 tokens"),
        ((x[:, :9], k, s), "x has 9 tokens"),
        ((x, k, s[:, None]), "scores must be [B, N]"),
        ((x, k, s, 0), "knn must be >= 1"),
        ((x, k.int(), s), "keys must be a floating-point"),
        ((x.int(), k, s), "x must be a floating-point"),
    ]


def _error_impls(bk):
    if bk == "reference":
        return ref.vispruner_select, ref.prumerge
    if bk == "triton":
        vis, pm, _ = backend(bk)
        return vis, pm
    return ops.vispruner_select, ops.prumerge


@pytest.mark.parametrize("bk", ["cpu", "reference", "triton"])
def test_bad_input(bk):
    vis, pm = _error_impls(bk)
    for args, words in _vis_calls():
        with pytest.raises(ValueError) as e:
            vis(*args)
        assert words in str(e.value), (args, str(e.value))
    for args, words in _pm_calls():
        with pytest.raises(ValueError) as e:
            pm(*args)
        assert words in str(e.value), (args, str(e.value))


def test_bad_input_devices():
    x, k, s = torch.randn(2, 10, 4), torch.randn(2, 10, 3), torch.rand(2, 10)
    with pytest.raises((ValueError, RuntimeError)):
        ops.vispruner_select(x, s.to("meta"), 3)
    with pytest.raises((ValueError, RuntimeError)):
        ops.prumerge(x, k.to("meta"), s)
    for fn in (ref.vispruner_select, *(() if TP is None else (TP.vispruner_select,))):
        with pytest.raises(ValueError, match="one device"):
            fn(x, s.to("meta"), 3)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_cuda_host_waits():
    """vispruner_select never waits for the device; prumerge waits once (the output size)."""
    import warnings

    x = features(4, 576, 64, seed=81, dtype=torch.float32).cuda()
    keys = features(4, 576, 64, seed=82, dtype=torch.float32).cuda()
    s = attention_like(4, 576, seed=83, dtype=torch.float32).cuda()
    ops.vispruner_select(x, s, 64)
    ops.prumerge(x, keys, s, plus=True)  # warm-up: compiles the kernels
    torch.cuda.synchronize()
    for fn, allowed in ((lambda: ops.vispruner_select(x, s, 64), 0), (lambda: ops.prumerge(x, keys, s, plus=True), 1)):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [m for m in w if "synchroniz" in str(m.message)]
        assert len(syncs) <= allowed, [str(m.message) for m in syncs]
