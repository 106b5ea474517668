"""The vtk ops on CUDA tensors against vtkernels.reference (GPU only; skipped without CUDA).

Selection ops (topk_indices, gather_tokens, fopru_select) are served by the CUDA C++ kernels of
csrc/cuda when the extension was built with CUDA (else by Triton) and must equal the reference
exactly: same indices, same bits. Scoring ops are served by Triton and compared with tolerances
against a float64 reference on the same rounded inputs. Also: CUDA graph capture and replay,
and torch.compile(fullgraph=True).
"""
import pytest
import torch
from torch.testing import assert_close

import vtkernels
from vtkernels import ops
from vtkernels import reference as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SIZES = [1, 2, 7, 49, 576, 2880, 50000]
SELECT_OPS = ("topk_indices", "gather_tokens", "fopru_select")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _extension_has_cuda_kernels() -> bool:
    """Whether vtkernels._C was built with csrc/cuda (kernel names end up in the binary)."""
    if vtkernels.extension_error is not None:
        return False
    import vtkernels._C as C
    with open(C.__file__, "rb") as f:
        return b"topk_indices_kernel" in f.read()


def _scores(kind, B, N, seed):
    """Scores in float64 (exact in every dtype they are cast to, except "rand")."""
    g = _gen(seed)
    if kind == "rand":
        return torch.randn(B, N, generator=g, dtype=torch.float64)
    if kind == "ties":
        return torch.randint(0, 4, (B, N), generator=g).to(torch.float64)
    if kind == "equal":
        return torch.full((B, N), 0.25, dtype=torch.float64)
    # NaN, infinities, signed zeros and subnormals (of float32; they flush to 0 in float16 and
    # bfloat16 keeps them): a backend that compares floats with flush-to-zero would tie them with 0.
    vals = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1.0, -1.0, 1e-40, -1e-40,
                         3e-39, 2.0], dtype=torch.float64)
    return vals[torch.randint(0, len(vals), (B, N), generator=g)]


def _noncontiguous(s):
    """The same values as s [B, N], as a view with strides (1, B) into a larger buffer."""
    B, N = s.shape
    buf = torch.empty(2 * N, B, dtype=s.dtype, device=s.device)
    buf[:N] = s.t()
    return buf.t()[:, :N]


def _keeps(N, W=None):
    ks = {1, 2, N // 4, N // 2 + 1, N - 1, N}
    if W:
        ks |= {W, W - 1, W + 1, 2 * W + 1, N - W}
    return sorted(k for k in ks if 1 <= k <= N)


# --- backends ----------------------------------------------------------------------------------

def test_selection_ops_served_by_compiled_cuda_kernels():
    if not _extension_has_cuda_kernels():
        pytest.skip("vtkernels._C was built without CUDA kernels (VTK_BUILD_CUDA=1 builds them)")
    for name in SELECT_OPS:
        assert vtkernels.backend_of(name, "CUDA") == "compiled", name


# --- topk_indices ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", SIZES)
def test_topk_indices(dtype, N):
    for seed, kind in enumerate(("rand", "ties", "equal", "special")):
        s = _scores(kind, 3, N, seed + N).to(dtype)
        sc = s.cuda()
        for nc in (False, True):
            x = _noncontiguous(sc) if nc else sc
            for k in _keeps(N):
                got = ops.topk_indices(x, k)
                assert got.dtype == torch.int64 and got.shape == (3, k) and got.is_cuda
                assert torch.equal(got.cpu(), ref.topk_indices(s, k)), (kind, nc, k)


def test_topk_tie_and_nan_rule():
    s = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]], device="cuda")
    assert ops.topk_indices(s, 2).tolist() == [[1, 2]]
    s = torch.tensor([[float("nan"), -float("inf"), 0.0, float("nan")]], device="cuda")
    assert ops.topk_indices(s, 2).tolist() == [[1, 2]]
    assert ops.topk_indices(s, 3).tolist() == [[0, 1, 2]]
    s = torch.tensor([[-0.0, 0.0, -0.0]], device="cuda")
    assert ops.topk_indices(s, 1).tolist() == [[0]]
    s = torch.tensor([[0.0, 1e-40, -1e-40]], device="cuda")  # subnormals are not zero
    assert ops.topk_indices(s, 1).tolist() == [[1]]
    assert ops.topk_indices(s, 2).tolist() == [[0, 1]]


def test_topk_many_rows_and_shared_memory_boundary():
    # 9216 float keys (36 KiB) are the most a block caches; one more re-reads global memory.
    for N in (4608, 4609, 9216, 9217):
        for dtype in (torch.float32, torch.float64):
            s = _scores("ties", 5, N, N).to(dtype)
            for k in (1, N // 3, N):
                assert torch.equal(ops.topk_indices(s.cuda(), k).cpu(), ref.topk_indices(s, k)), (N, dtype, k)
    s = torch.randn(1000, 49, generator=_gen(3))
    assert torch.equal(ops.topk_indices(s.cuda(), 7).cpu(), ref.topk_indices(s, 7))


def test_topk_bad_input():
    s = torch.randn(2, 5, device="cuda")
    for k in (0, 6):
        with pytest.raises((ValueError, RuntimeError), match="k"):
            ops.topk_indices(s, k)
    with pytest.raises((ValueError, RuntimeError), match="scores"):
        ops.topk_indices(torch.ones(2, 5, dtype=torch.int64, device="cuda"), 1)


# --- gather_tokens -----------------------------------------------------------------------------

def _tokens(B, N, D, dtype, layout, seed):
    """x [B, N, D] in one of several memory layouts (made after the cast, which would compact it)."""
    g = _gen(seed)
    if layout == "contiguous":
        return torch.randn(B, N, D, generator=g).to(dtype)
    if layout == "strided_d":  # stride over D is 2
        return torch.randn(B, N, 2 * D, generator=g).to(dtype)[:, :, ::2]
    if layout == "permuted":  # [B, N, D] view of an [N, B, D] tensor
        return torch.randn(N, B, D, generator=g).to(dtype).permute(1, 0, 2)
    # "offset": a storage offset of one element breaks 16-byte alignment
    return torch.randn(B * N * D + 1, generator=g).to(dtype)[1:].view(B, N, D)


def _to_cuda_keep_layout(x):
    """x on the GPU with the same strides and storage offset (a plain .cuda() would compact it)."""
    flat = torch.empty(0, dtype=x.dtype).set_(x.untyped_storage())
    return flat.cuda().as_strided(x.shape, x.stride(), x.storage_offset())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided_d", "permuted", "offset"])
@pytest.mark.parametrize("N,D", [(1, 1), (7, 3), (49, 8), (576, 64), (2880, 1024)])
def test_gather_tokens(dtype, layout, N, D):
    x = _tokens(2, N, D, dtype, layout, N + D)
    xc = _to_cuda_keep_layout(x)
    assert xc.stride() == x.stride()
    g = _gen(N)
    for k in sorted({1, N, 2 * N + 1}):
        idx = torch.randint(0, N, (2, k), generator=g)
        want = ref.gather_tokens(x, idx)
        for i in (idx, idx.int(), idx.t().contiguous().t()):  # int64, int32, non-contiguous
            got = ops.gather_tokens(xc, i.cuda())
            assert got.dtype == dtype and got.shape == (2, k, D) and got.is_contiguous()
            assert torch.equal(got.cpu(), want), (k, i.dtype)


def test_gather_tokens_out_of_range_raises():
    x = torch.randn(2, 7, 4, device="cuda")
    for bad in (-1, 7):
        idx = torch.zeros(2, 3, dtype=torch.int64, device="cuda")
        idx[1, 2] = bad
        with pytest.raises((ValueError, RuntimeError), match="indices"):
            ops.gather_tokens(x, idx)


# --- fopru_select --------------------------------------------------------------------------------

FOPRU_GRIDS = [(1, 0), (4, 0), (49, 0), (576, 0), (2880, 48), (12, 4), (12, 1), (12, 12), (50000, 10),
               (50000, 2), (50000, 50000)]


@pytest.mark.parametrize("N,gw", FOPRU_GRIDS)
@pytest.mark.parametrize("sdtype", DTYPES)
def test_fopru_select(N, gw, sdtype):
    W = gw or round(N ** 0.5)
    D = 8 if N < 50000 else 2
    for seed, kind in enumerate(("rand", "ties", "equal", "special")):
        s = _scores(kind, 2, N, seed + N).to(sdtype)
        xdtype, layout = [(torch.float16, "contiguous"), (torch.float32, "permuted"),
                          (torch.bfloat16, "strided_d"), (torch.float64, "offset")][seed]
        x = _tokens(2, N, D, xdtype, layout, seed)
        xc = _to_cuda_keep_layout(x)
        sc = _noncontiguous(s.cuda()) if seed % 2 else s.cuda()
        keeps = _keeps(N, W) if N < 50000 else sorted({k for k in (1, W - 1, W + 1, N // 3, N) if 1 <= k <= N})
        for keep in keeps:
            for strategy in ("rank", "row"):
                got_x, got_i = ops.fopru_select(xc, sc, keep, strategy, gw)
                want_x, want_i = ref.fopru_select(x, s, keep, strategy, gw)
                assert torch.equal(got_i.cpu(), want_i), (kind, keep, strategy)
                assert got_x.dtype == xdtype and got_x.is_contiguous()
                assert torch.equal(got_x.cpu(), want_x), (kind, keep, strategy)


def test_fopru_row_strategy_ties_between_rows():
    # Rows 1 and 3 tie on their sum: the lower row wins the whole-row slot, the other row is the
    # partial one and gives its best tokens.
    s = torch.tensor([[0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 0.5, 0.5, 0.5, 3.0, 2.0, 1.0]], device="cuda")
    x = torch.arange(12.0, device="cuda").view(1, 12, 1)
    tok, idx = ops.fopru_select(x, s, 5, "row", 3)
    assert idx.tolist() == [[3, 4, 5, 9, 10]]
    assert tok.flatten().tolist() == [3.0, 4.0, 5.0, 9.0, 10.0]


def test_fopru_select_bad_input():
    x, s = torch.randn(1, 12, 4, device="cuda"), torch.randn(1, 12, device="cuda")
    with pytest.raises((ValueError, RuntimeError), match="strategy"):
        ops.fopru_select(x, s, 3, "columns", 0)
    with pytest.raises((ValueError, RuntimeError), match="grid_width"):
        ops.fopru_select(x, s, 3, "row", 5)
    with pytest.raises((ValueError, RuntimeError), match="keep"):
        ops.fopru_select(x, s, 13, "rank", 0)
    with pytest.raises((ValueError, RuntimeError), match="device"):
        ops.fopru_select(x.cpu(), s, 3, "rank", 0)


# --- CUDA graphs and torch.compile ----------------------------------------------------------------

def _capture(fn):
    """Captures fn() into a CUDA graph after a warm-up on a side stream; returns (graph, outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def test_selection_ops_in_cuda_graph():
    B, N, D, keep = 2, 576, 64, 144
    g = _gen(11)
    s = torch.randn(B, N, generator=g).cuda()
    x = torch.randn(B, N, D, generator=g).half().cuda()
    idx = torch.randint(0, N, (B, 100), generator=g).cuda()
    idx32 = idx.int()

    def step():
        return (ops.topk_indices(s, keep), ops.gather_tokens(x, idx), ops.gather_tokens(x, idx32),
                *ops.fopru_select(x, s, keep, "rank"), *ops.fopru_select(x, s, keep + 5, "row"))

    graph, out = _capture(step)
    for seed in range(3):
        g = _gen(100 + seed)
        s_new = torch.randn(B, N, generator=g)
        s_new[0, :50] = 0.5  # ties
        x_new = torch.randn(B, N, D, generator=g).half()
        idx_new = torch.randint(0, N, (B, 100), generator=g)
        s.copy_(s_new)
        x.copy_(x_new)
        idx.copy_(idx_new)
        idx32.copy_(idx_new)
        graph.replay()
        torch.cuda.synchronize()
        topk, gat, gat32, fx, fi, rx, ri = (t.cpu() for t in out)
        assert torch.equal(topk, ref.topk_indices(s_new, keep))
        assert torch.equal(gat, ref.gather_tokens(x_new, idx_new))
        assert torch.equal(gat32, ref.gather_tokens(x_new, idx_new))
        want_x, want_i = ref.fopru_select(x_new, s_new, keep, "rank")
        assert torch.equal(fi, want_i) and torch.equal(fx, want_x)
        want_x, want_i = ref.fopru_select(x_new, s_new, keep + 5, "row")
        assert torch.equal(ri, want_i) and torch.equal(rx, want_x)


def test_gather_tokens_in_cuda_graph_never_reads_out_of_range():
    # Inside a graph the range check (a host sync) is skipped; the kernel writes zero rows instead.
    x = torch.randn(2, 7, 16, device="cuda")
    idx = torch.zeros(2, 3, dtype=torch.int64, device="cuda")
    graph, out = _capture(lambda: ops.gather_tokens(x, idx))
    idx.copy_(torch.tensor([[0, -1, 6], [7, 1 << 40, 2]]))
    graph.replay()
    torch.cuda.synchronize()
    got = out.cpu()
    xc = x.cpu()
    assert torch.equal(got[0, 0], xc[0, 0]) and torch.equal(got[0, 2], xc[0, 6])
    assert torch.equal(got[1, 2], xc[1, 2])
    assert not got[0, 1].any() and not got[1, 0].any() and not got[1, 1].any()


def test_selection_ops_under_torch_compile():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def prune(x, s, keep):
        idx = ops.topk_indices(s, keep)
        kept = ops.gather_tokens(x, idx)
        fx, fi = ops.fopru_select(x, s, keep, "row")
        return kept * 2, idx, fx + 1, fi

    g = _gen(5)
    for B in (1, 3):
        s = torch.randn(B, 576, generator=g)
        x = torch.randn(B, 576, 32, generator=g).to(torch.bfloat16)
        kept, idx, fx, fi = prune(x.cuda(), s.cuda(), 100)
        want_i = ref.topk_indices(s, 100)
        assert torch.equal(idx.cpu(), want_i)
        assert torch.equal(kept.cpu(), ref.gather_tokens(x, want_i) * 2)
        want_fx, want_fi = ref.fopru_select(x, s, 100, "row")
        assert torch.equal(fi.cpu(), want_fi) and torch.equal(fx.cpu(), want_fx + 1)


# --- scoring ops (Triton on CUDA) -------------------------------------------------------------------

# float32 scores from inputs of each dtype, against a float64 reference on the same rounded inputs.
SCORE_TOL = {torch.float64: dict(atol=1e-9, rtol=1e-6), torch.float32: dict(atol=1e-6, rtol=2e-4),
             torch.float16: dict(atol=1e-6, rtol=2e-4), torch.bfloat16: dict(atol=1e-6, rtol=2e-4)}


def _qk(B, T, C, dtype, seed, fused):
    g = _gen(seed)
    if fused:  # non-contiguous views of a fused qkv projection
        qkv = (torch.randn(B, T, 3 * C, generator=g, dtype=torch.float64) * 2).to(dtype)
        return qkv[..., :C], qkv[..., C:2 * C]
    q = (torch.randn(B, T, C, generator=g, dtype=torch.float64) * 2).to(dtype)
    k = (torch.randn(B, T, C, generator=g, dtype=torch.float64) * 2).to(dtype)
    return q, k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,C,H", [(1, 2, 8, 1), (2, 17, 24, 3), (3, 50, 64, 4), (1, 577, 1024, 16)])
@pytest.mark.parametrize("fused", [False, True])
def test_scoring_ops(dtype, B, T, C, H, fused):
    q, k = _qk(B, T, C, dtype, T + C, fused)
    qc, kc = q.cuda(), k.cuda()
    if fused:  # keep the views non-contiguous on the GPU too
        qkv = torch.cat([q, k, k], dim=-1).cuda()
        qc, kc = qkv[..., :C], qkv[..., C:2 * C]
    q64, k64 = q.double(), k.double()
    tol = SCORE_TOL[dtype]
    got = ops.cls_attention(qc, kc, H)
    assert got.dtype == torch.float32 and got.is_cuda
    assert_close(got.cpu(), ref.cls_attention(q64, k64, H), **tol)
    for has_cls in (True, False):
        assert_close(ops.attention_received(qc, kc, H, has_cls=has_cls).cpu(),
                     ref.attention_received(q64, k64, H, has_cls=has_cls), **tol)
        assert_close(ops.fopru_significance(qc, kc, H, has_cls=has_cls).cpu(),
                     ref.fopru_significance(q64, k64, H, has_cls=has_cls), **tol)


def test_scoring_scale_float64():
    q, k = _qk(2, 33, 32, torch.float64, 3, False)
    for scale in (None, 0.05, 1.0):
        assert_close(ops.cls_attention(q.cuda(), k.cuda(), 4, scale).cpu(), ref.cls_attention(q, k, 4, scale),
                     atol=1e-9, rtol=1e-6)
        assert_close(ops.fopru_significance(q.cuda(), k.cuda(), 4, scale).cpu(),
                     ref.fopru_significance(q, k, 4, scale), atol=1e-9, rtol=1e-6)


# --- host waits, CUDA graphs of the other ops, several devices -------------------------------------

def _syncs(fn):
    """Host waits for the device while fn runs (torch's sync debug mode reports each one)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(m.message) for m in w if "synchroniz" in str(m.message)]


def test_selection_host_waits():
    """gather_tokens waits once (its index range check: both extremes in one copy); topk_indices
    and fopru_select never wait."""
    s = torch.randn(4, 576, device="cuda")
    x = torch.randn(4, 576, 64, device="cuda", dtype=torch.float16)
    idx = torch.randint(0, 576, (4, 144), device="cuda")
    for fn in (lambda: ops.gather_tokens(x, idx), lambda: ops.topk_indices(s, 144),
               lambda: ops.fopru_select(x, s, 144), lambda: ops.fopru_select(x, s, 144, "row")):
        fn()  # warm-up: Triton compilation, allocator
    assert len(_syncs(lambda: ops.gather_tokens(x, idx))) <= 1
    assert len(_syncs(lambda: ops.gather_tokens(x, idx.int()))) <= 1
    for fn in (lambda: ops.topk_indices(s, 144), lambda: ops.fopru_select(x, s, 144),
               lambda: ops.fopru_select(x, s, 144, "row")):
        assert _syncs(fn) == []


def test_scoring_ops_in_cuda_graph():
    """The scoring ops (Triton) capture and replay: the replay follows new q and k."""
    B, T, C, H = 2, 50, 64, 4
    q = torch.empty(B, T, C, device="cuda", dtype=torch.float16)
    k = torch.empty_like(q)
    q0, k0 = _qk(B, T, C, torch.float16, 1, False)
    q.copy_(q0)
    k.copy_(k0)

    def step():
        return (ops.cls_attention(q, k, H), ops.attention_received(q, k, H),
                ops.attention_received(q, k, H, has_cls=False), ops.fopru_significance(q, k, H),
                ops.fopru_significance(q, k, H, has_cls=False))

    graph, out = _capture(step)
    tol = SCORE_TOL[torch.float16]
    for seed in range(2, 5):
        q_new, k_new = _qk(B, T, C, torch.float16, seed, False)
        q.copy_(q_new)
        k.copy_(k_new)
        graph.replay()
        torch.cuda.synchronize()
        q64, k64 = q_new.double(), k_new.double()
        want = (ref.cls_attention(q64, k64, H), ref.attention_received(q64, k64, H),
                ref.attention_received(q64, k64, H, has_cls=False), ref.fopru_significance(q64, k64, H),
                ref.fopru_significance(q64, k64, H, has_cls=False))
        for got, w in zip(out, want):
            assert_close(got.cpu(), w, **tol)


def test_vispruner_select_in_cuda_graph():
    """vispruner_select never waits for the device, so it captures; float64, where it equals the
    reference exactly."""
    B, N, C, keep = 2, 144, 32, 24
    g = _gen(21)
    x = torch.randn(B, N, C, generator=g, dtype=torch.float64).cuda()
    s = torch.softmax(torch.randn(B, N, generator=g, dtype=torch.float64), dim=-1).cuda()
    graph, out = _capture(lambda: (ops.vispruner_select(x, s, keep), ops.vispruner_select(x, s, keep, 0.25, 3)))
    for seed in range(3):
        g = _gen(200 + seed)
        x_new = torch.randn(B, N, C, generator=g, dtype=torch.float64)
        s_new = torch.softmax(torch.randn(B, N, generator=g, dtype=torch.float64), dim=-1)
        x.copy_(x_new)
        s.copy_(s_new)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[0].cpu(), ref.vispruner_select(x_new, s_new, keep))
        assert torch.equal(out[1].cpu(), ref.vispruner_select(x_new, s_new, keep, 0.25, 3))


def test_gather_and_fopru_select_fill_the_grid_at_batch_1():
    """B = 1 and few kept rows: rows split into segments across warps (launch sizing); every
    segment boundary lands right, for every element size, for rows that are not a whole number
    of segments, and on the element-wise path (rows that are not whole 16-byte words)."""
    g = _gen(41)
    for dtype in (torch.float16, torch.float32, torch.float64):
        for D in (4096, 4104, 1000, 1001, 8):  # 1001 halves: not whole 16-byte words
            x = torch.randn(1, 576, D, generator=g).to(dtype)
            s = torch.randn(1, 576, generator=g)
            idx = torch.randint(0, 576, (1, 3), generator=g)
            assert torch.equal(ops.gather_tokens(x.cuda(), idx.cuda()).cpu(), ref.gather_tokens(x, idx)), (dtype, D)
            for keep in (1, 5, 144):
                got_x, got_i = ops.fopru_select(x.cuda(), s.cuda(), keep)
                want_x, want_i = ref.fopru_select(x, s, keep)
                assert torch.equal(got_i.cpu(), want_i) and torch.equal(got_x.cpu(), want_x), (dtype, D, keep)


# Last in the file: a kernel launched on the wrong device faults, and a fault poisons the process's
# CUDA context for every test after it (the GPU lane runs each test file in its own process).
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ops_on_second_device():
    """Inputs on cuda:1 while cuda:0 is current: every op runs on cuda:1 (device guards, the
    streams of that device) and gives what the reference gives."""
    dev = torch.device("cuda", 1)
    assert torch.cuda.current_device() == 0
    g = _gen(31)
    s = torch.randn(3, 576, generator=g)
    x = torch.randn(3, 576, 64, generator=g).half()
    idx = torch.randint(0, 576, (3, 100), generator=g)
    q, k = _qk(3, 50, 64, torch.float32, 32, False)
    xf = torch.randn(3, 576, 32, generator=g, dtype=torch.float64)
    keys = torch.randn(3, 576, 16, generator=g, dtype=torch.float64)
    sd = torch.softmax(s.double() * 0.7, dim=-1)
    got = {
        "topk": ops.topk_indices(s.to(dev), 144),
        "gather": ops.gather_tokens(x.to(dev), idx.to(dev)),
        "fopru": ops.fopru_select(x.to(dev), s.to(dev), 144, "row")[0],
        "cls": ops.cls_attention(q.to(dev), k.to(dev), 4),
        "fopru_sig": ops.fopru_significance(q.to(dev), k.to(dev), 4),
        "vispruner": ops.vispruner_select(xf.to(dev), sd.to(dev), 64),
        "prumerge": ops.prumerge(xf.to(dev), keys.to(dev), sd.to(dev))[0],
    }
    torch.cuda.synchronize(dev)
    for name, t in got.items():
        assert t.device == dev, name
    assert torch.equal(got["topk"].cpu(), ref.topk_indices(s, 144))
    assert torch.equal(got["gather"].cpu(), ref.gather_tokens(x, idx))
    assert torch.equal(got["fopru"].cpu(), ref.fopru_select(x, s, 144, "row")[0])
    assert_close(got["cls"].cpu(), ref.cls_attention(q.double(), k.double(), 4), **SCORE_TOL[torch.float32])
    assert_close(got["fopru_sig"].cpu(), ref.fopru_significance(q.double(), k.double(), 4), **SCORE_TOL[torch.float32])
    assert torch.equal(got["vispruner"].cpu(), ref.vispruner_select(xf, sd, 64))
    assert_close(got["prumerge"].cpu(), ref.prumerge(xf, keys, sd)[0], atol=1e-9, rtol=1e-9)
    # nothing ran on (or allocated memory of) cuda:0 for the cuda:1 calls
    assert torch.cuda.current_device() == 0
