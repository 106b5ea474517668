"""Triton launchers against vtkernels.reference, called directly.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (conftest.py sets it; it
is set here too for a direct run of this file). With CUDA and no interpreter they run on the GPU.
The interpreter is slow: sizes are chosen so that the whole file stays well under 3 minutes.
"""
import os

if "TRITON_INTERPRET" not in os.environ:  # before any Triton kernel is defined
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vtkernels import reference as ref

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")
if INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("no CUDA device and TRITON_INTERPRET is off", allow_module_level=True)

try:
    import triton  # noqa: F401
except Exception as e:  # pragma: no cover
    pytest.skip(f"triton unavailable: {e}", allow_module_level=True)

from vtkernels.triton import _launch  # noqa: E402
from vtkernels.triton import prune as TP  # noqa: E402
from vtkernels.triton import scoring as TS  # noqa: E402
from vtkernels.triton import select as TSel  # noqa: E402

if INTERPRET and type(TSel._topk_kernel).__name__ != "InterpretedFunction":
    pytest.skip("vtkernels.triton was imported before TRITON_INTERPRET=1 was set (no GPU here); "
                "run this file alone or set TRITON_INTERPRET=1", allow_module_level=True)

# inf + -inf in FoPru row sums is a NaN on purpose; the interpreter's numpy warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

# bfloat16 runs under the interpreter too: the kernels never rely on the interpreter's own
# bfloat16 conversions (stored as uint16, subnormals mangled) or on its bfloat16 tl.dot.
FLOAT_DTYPES = [torch.float32, torch.float16, torch.float64, torch.bfloat16]
HALF_DTYPES = (torch.float16, torch.bfloat16)

# Scores come back as float32. Float64 inputs are the exactness mode: only the final rounding
# to float32 (and summation order far below it) may differ. 16-bit inputs are compared with the
# reference run in float64 on the same (already rounded) values: the kernels accumulate in
# float32 from exact 16-bit products, so only float32 accumulation error is allowed, not the
# input rounding (a bfloat16 rounding inside the kernel, ~4e-3 relative, would fail).
TOL = {
    torch.float64: dict(rtol=1e-6, atol=1e-9),
    torch.float32: dict(rtol=2e-4, atol=1e-6),
    torch.float16: dict(rtol=2e-4, atol=1e-6),
    torch.bfloat16: dict(rtol=2e-4, atol=1e-6),
}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _qk(B, T, C, dtype, seed=0, layout="fused"):
    """q, k as non-contiguous views: of a fused qkv [B, T, 3C], or a [T, B, C] tensor transposed."""
    g = _gen(seed)
    if layout == "fused":
        qkv = torch.randn(B, T, 3 * C, generator=g).to(dtype).to(DEVICE)
        return qkv[..., :C], qkv[..., C:2 * C]
    if layout == "transposed":
        q = torch.randn(T, B, C, generator=g).to(dtype).to(DEVICE).transpose(0, 1)
        k = torch.randn(T, B, C, generator=g).to(dtype).to(DEVICE).transpose(0, 1)
        return q, k
    q = torch.randn(B, T, C, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(B, T, C, generator=g).to(dtype).to(DEVICE)
    return q, k


def _ref_scores(name, q, k, H, **kw):
    if q.dtype in HALF_DTYPES:  # float64 oracle on the same 16-bit values (exact upcast)
        q, k = q.double(), k.double()
    return getattr(ref, name)(q.cpu(), k.cpu(), H, **kw)


# --- scoring ---------------------------------------------------------------------------------

SCORING_OPS = ["cls_attention", "attention_received", "fopru_significance"]

# (B, T, C, H): head dims 16, 64, 80, 128; T odd, tiny and one LLaVA-sized (cheap C, one head).
SCORING_SHAPES = [(2, 2, 32, 2), (2, 17, 64, 1), (2, 50, 160, 2), (1, 577, 128, 1)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SCORING_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_scoring_matches_reference(shape, dtype):
    B, T, C, H = shape
    if INTERPRET and T > 100 and dtype != torch.float32:
        pytest.skip("one large case is enough under the interpreter")
    q, k = _qk(B, T, C, dtype, seed=T)
    assert not q.is_contiguous()
    for name in SCORING_OPS:
        got = getattr(TS, name)(q, k, H)
        want = _ref_scores(name, q, k, H)
        assert got.dtype == torch.float32 and got.shape == (B, T - 1)
        torch.testing.assert_close(got.cpu(), want, **TOL[dtype], msg=name)


@pytest.mark.parametrize("layout", ["transposed", "contiguous"])
def test_scoring_layouts_scale_and_no_cls(layout):
    q, k = _qk(2, 17, 48, torch.float32, seed=3, layout=layout)
    for name in SCORING_OPS:
        want = _ref_scores(name, q, k, 3, scale=0.3)
        got = getattr(TS, name)(q, k, 3, 0.3)
        torch.testing.assert_close(got.cpu(), want, **TOL[torch.float32])
    for name in ("attention_received", "fopru_significance"):
        got = getattr(TS, name)(q, k, 3, None, False)
        want = _ref_scores(name, q, k, 3, has_cls=False)
        assert got.shape == (2, 17)
        torch.testing.assert_close(got.cpu(), want, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fopru_significance_takes_rows_or_columns(dtype):
    """Image 0: patch keys alike, CLS key strong -> rows vary more; image 1: random -> columns."""
    B, T, C, H = 2, 26, 64, 2
    q, k = _qk(B, T, C, dtype, seed=7, layout="contiguous")
    k[0, 1:] = 0.01 * k[0, 1:]
    k[0, 0] = 4.0 * k[0, 0]
    a = _ref_scores("attention_probs", q, k, H).mean(dim=1)[:, 1:, 1:]
    col, row = a.mean(dim=1), a.mean(dim=2)
    use_col = col.var(dim=1, unbiased=False) >= row.var(dim=1, unbiased=False)
    assert use_col.tolist() == [False, True]
    got = TS.fopru_significance(q, k, H)
    torch.testing.assert_close(got.cpu(), _ref_scores("fopru_significance", q, k, H), **TOL[dtype])
    torch.testing.assert_close(got[0].cpu(), row[0].float(), **TOL[dtype])


# (H, head_dim): every head size walks the head in BLOCK_D chunks (_patch_attention_config);
# 80 and 1280 end on a partial chunk in some dtypes, two heads check the second head's channel
# offsets, one head of 1024 is PruMerge's. T is odd and spans more than one key block.
HEADS = [(2, 64), (2, 80), (2, 1024), (1, 1024), (2, 1280)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}x{h[1]}")
def test_scoring_large_head_dim(heads, dtype):
    H, DH = heads
    B, T = (2 if DH < 1024 else 1), 37  # the interpreter is slow on wide heads
    if DH >= 1024:  # the chunk loop really runs, at the GPU's chunk size too
        assert TS._patch_attention_config(T, DH, dtype, True, True, True)["NUM_D"] > 1
        assert TS._patch_attention_config(T, DH, dtype, True, True, False)["NUM_D"] > 1
    q, k = _qk(B, T, H * DH, dtype, seed=DH + H)
    for name in SCORING_OPS:
        got = getattr(TS, name)(q, k, H)
        assert got.shape == (B, T - 1)
        torch.testing.assert_close(got.cpu(), _ref_scores(name, q, k, H), **TOL[dtype], msg=name)
    for name in ("attention_received", "fopru_significance"):
        got = getattr(TS, name)(q, k, H, None, False)
        torch.testing.assert_close(got.cpu(), _ref_scores(name, q, k, H, has_cls=False), **TOL[dtype],
                                   msg=name)


def test_cls_logits_grid_spreads_one_image(monkeypatch):
    """Heads are in the grid: one image launches H programs per key block."""
    grids = []
    real = TS._cls_logits_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(TS, "_cls_logits_kernel", Spy())
    q, k = _qk(1, 37, 4 * 16, torch.float32, seed=5)
    got = TS.cls_attention(q, k, 4)
    torch.testing.assert_close(got.cpu(), _ref_scores("cls_attention", q, k, 4), **TOL[torch.float32])
    assert grids and grids[0][0] == 4
    # LLaVA-1.5 on a GPU, batch 1: hundreds of programs, not a handful.
    cfg = TS._cls_logits_config(577, 64, torch.float32, interpret=False)
    assert 16 * -(-577 // cfg["BLOCK_T"]) >= 128


def test_scoring_deterministic():
    q, k = _qk(1, 50, 64, torch.float32, seed=11)
    for name in SCORING_OPS:
        fn = getattr(TS, name)
        assert torch.equal(fn(q, k, 2), fn(q, k, 2)), name


def test_scoring_rejects_bad_input():
    q, k = _qk(1, 5, 8, torch.float32, layout="contiguous")
    cases = [
        (q, k[:, :4], 2, {}),                          # shape mismatch
        (q, k, 3, {}),                                 # 3 heads do not divide C=8
        (q[0], k[0], 2, {}),                           # rank 2
        (q.to(torch.int32), k.to(torch.int32), 2, {}), # integer dtype
        (q, k.double(), 2, {}),                        # dtype mismatch
        (q[:, :1], k[:, :1], 2, {}),                   # T=1 with CLS: no patch token
    ]
    for name in SCORING_OPS:
        for a, b, h, kw in cases:
            with pytest.raises(ValueError):
                getattr(TS, name)(a, b, h, **kw)
    with pytest.raises(ValueError):
        TS.cls_attention(q, k, 2, float("nan"))


# --- selection -------------------------------------------------------------------------------

MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}


def _subnormals(N, dtype, g):
    """N values of dtype: +-0, +-m * (smallest subnormal of dtype), m < 16 (ties), and the
    smallest normal, exact in float64 and in dtype."""
    fi = torch.finfo(dtype)
    tiny = fi.smallest_normal * 2.0 ** -MANTISSA_BITS[dtype]
    m = torch.randint(0, 16, (N,), generator=g).to(torch.float64)
    sign = torch.randint(0, 2, (N,), generator=g).to(torch.float64) * 2 - 1
    v = sign * m * tiny
    v[torch.rand(N, generator=g) < 0.1] = fi.smallest_normal
    return v


def _score_rows(N, dtype, seed=0):
    """Rows [6, N]: distinct values, heavy ties, all equal, NaN/inf/+-0/denormal mix, all NaN,
    subnormals of dtype (+-0, ties, smallest normal)."""
    g = _gen(seed)
    distinct = torch.randn(N, generator=g, dtype=torch.float64)
    ties = torch.randint(0, 4, (N,), generator=g).to(torch.float64)
    equal = torch.full((N,), 0.5, dtype=torch.float64)
    special = torch.randint(-1, 2, (N,), generator=g).to(torch.float64)
    u = torch.rand(N, generator=g)
    special[u < 0.15] = float("nan")
    special[(u >= 0.15) & (u < 0.25)] = float("-inf")
    special[(u >= 0.25) & (u < 0.35)] = -0.0
    special[(u >= 0.35) & (u < 0.40)] = float("inf")
    special[(u >= 0.40) & (u < 0.45)] = 0.0
    special[(u >= 0.45) & (u < 0.50)] = 1e-40   # float32 denormal (0 in float16)
    special[(u >= 0.50) & (u < 0.55)] = -1e-40
    all_nan = torch.full((N,), float("nan"), dtype=torch.float64)
    sub = _subnormals(N, dtype, g)
    return torch.stack([distinct, ties, equal, special, all_nan, sub]).to(dtype)


def _check_topk(s, ks):
    s_cpu = s.cpu()
    for k in ks:
        got = TSel.topk_indices(s, k)
        want = ref.topk_indices(s_cpu, k)
        assert got.dtype == torch.int64
        assert torch.equal(got.cpu(), want), (k, got, want)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("N", [1, 2, 7, 49, 576])
def test_topk_matches_reference(N, dtype):
    s = _score_rows(N, dtype, seed=N).to(DEVICE)
    _check_topk(s, sorted({1, max(1, N // 3), max(1, N - 1), N}))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_topk_subnormals(dtype):
    """Subnormals of every dtype rank by value: above +-0 (which tie), below the smallest normal."""
    tiny = torch.finfo(dtype).smallest_normal * 2.0 ** -MANTISSA_BITS[dtype]
    s = torch.tensor([[0.0, tiny, -tiny, 0.0]], dtype=torch.float64).to(dtype)
    assert s[0, 1] > 0 and s[0, 2] < 0  # really subnormal values of dtype, not flushed
    assert TSel.topk_indices(s.to(DEVICE), 1).cpu().tolist() == [[1]]
    assert TSel.topk_indices(s.to(DEVICE), 3).cpu().tolist() == [[0, 1, 3]]
    vals = [0.0, -0.0, tiny, -tiny, 2 * tiny, 3 * tiny, -2 * tiny,
            torch.finfo(dtype).smallest_normal, float("nan"), float("-inf")]
    row = torch.tensor(vals * 3, dtype=torch.float64)[torch.randperm(30, generator=_gen(6))]
    s = row.reshape(1, 30).to(dtype).to(DEVICE)
    _check_topk(s, list(range(1, 31)))
    # FoPru rows whose sums differ only by subnormals (float64 row sums of the exact values).
    s = torch.tensor([[0.0, 0.0, tiny, 0.0, -tiny, 0.0, 0.0, -0.0, tiny, tiny]],
                     dtype=torch.float64).to(dtype).to(DEVICE)
    x = torch.randn(1, 10, 3, generator=_gen(6)).to(dtype).to(DEVICE)
    _check_fopru(x, s, list(range(1, 11)), "row", 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_topk_large_row(dtype):
    s = _score_rows(2880, dtype, seed=5).to(DEVICE)
    _check_topk(s, [1, 1000, 2880])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_topk_multi_block_rows(dtype, monkeypatch):
    """Rows longer than one block stream block by block (normally only beyond 4096)."""
    monkeypatch.setattr(TSel, "_MAX_BLOCK", 64)
    s = _score_rows(150, dtype, seed=9).to(DEVICE)
    _check_topk(s, [1, 70, 150])


def test_topk_noncontiguous_and_near_values():
    base = torch.randn(300, 3, generator=_gen(1)).t()  # [3, 300], stride (1, 3)
    base[1, ::2] = 1.0
    base[1, 1::2] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))  # one ulp apart
    base[2] = torch.tensor([-0.0, 0.0]).repeat(150)
    s = base.to(DEVICE)
    assert not s.is_contiguous()
    _check_topk(s, [1, 150, 151, 299])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32], ids=str)
def test_gather_tokens(dtype, idx_dtype):
    g = _gen(2)
    x = torch.randn(2, 40, 2 * 36, generator=g).to(dtype)[:, :, ::2]  # non-contiguous rows
    idx = torch.randint(0, 40, (2, 13), generator=g)  # any order, repeats allowed
    idx[0, 0], idx[1, 0] = 0, 39
    got = TSel.gather_tokens(x.to(DEVICE), idx.to(idx_dtype).to(DEVICE))
    assert got.is_contiguous() and got.dtype == dtype
    assert torch.equal(got.cpu(), ref.gather_tokens(x, idx))


def test_gather_rejects_bad_input():
    x = torch.randn(2, 10, 4, device=DEVICE)
    ok = torch.zeros(2, 3, dtype=torch.int64, device=DEVICE)
    for bad in (ok + 10, ok - 1):
        with pytest.raises(ValueError):
            TSel.gather_tokens(x, bad)
    for args in ((x, ok.float()), (x, ok[0]), (x[:1], ok), (x[0], ok), (x.int(), ok)):
        with pytest.raises(ValueError):
            TSel.gather_tokens(*args)


def _check_fopru(x, s, keeps, strategy, grid_width=0):
    x_cpu, s_cpu = x.cpu(), s.cpu()
    for keep in keeps:
        tok, idx = TSel.fopru_select(x, s, keep, strategy, grid_width)
        tok_ref, idx_ref = ref.fopru_select(x_cpu, s_cpu, keep, strategy, grid_width)
        assert torch.equal(idx.cpu(), idx_ref), (strategy, keep, grid_width, idx, idx_ref)
        assert tok.is_contiguous() and tok.shape == tok_ref.shape
        assert torch.equal(tok.cpu(), tok_ref)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("strategy", ["rank", "row"])
@pytest.mark.parametrize("N", [1, 49, 576])
def test_fopru_select_square(N, strategy, dtype):
    s = _score_rows(N, dtype, seed=N + 1).to(DEVICE)
    x = torch.randn(s.shape[0], N, 6, generator=_gen(N)).to(dtype).to(DEVICE)
    W = int(N ** 0.5)
    keeps = sorted({1, N, W, min(N, 2 * W + 3), max(1, N - 1)})
    _check_fopru(x, s, keeps, strategy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fopru_select_grid_width(dtype):
    s = _score_rows(50, dtype, seed=4).to(DEVICE)
    x = torch.randn(s.shape[0], 50, 64, generator=_gen(4)).to(dtype).to(DEVICE).transpose(1, 2)
    x = x.contiguous().transpose(1, 2)  # non-contiguous [B, N, D] view
    for gw, keeps in ((1, [1, 23, 50]), (10, [7, 23]), (5, [1, 23]), (50, [23, 50])):
        _check_fopru(x, s, keeps, "row", gw)
    _check_fopru(x, s, [1, 23, 50], "rank", 7)  # grid_width is ignored by "rank"


def test_fopru_select_row_ties_and_large():
    # Row sums tie (equal rows) -> lower row first; a NaN row sum (inf + -inf) ranks last.
    s = torch.zeros(2, 36)
    s[1, :6] = float("inf")
    s[1, 6] = float("-inf")
    s[1, 12:18] = 1.0
    _check_fopru(torch.randn(2, 36, 3).to(DEVICE), s.to(DEVICE), [1, 6, 7, 20, 36], "row")
    # LLaVA-NeXT sized: 5 crops' worth of tokens on a 48-wide grid, and the multi-block path.
    s = torch.randn(1, 2880, generator=_gen(8)).to(DEVICE)
    x = torch.randn(1, 2880, 4, generator=_gen(8)).to(DEVICE)
    _check_fopru(x, s, [1, 100, 2880], "row", 48)
    _check_fopru(x, s, [700], "rank")


def test_fopru_select_multi_block(monkeypatch):
    monkeypatch.setattr(TSel, "_MAX_BLOCK", 32)
    s = _score_rows(100, torch.float32, seed=12).to(DEVICE)
    x = torch.randn(s.shape[0], 100, 3, generator=_gen(12)).to(DEVICE)
    _check_fopru(x, s, [1, 33], "row", 2)   # 50 rows of 2: rows stream in blocks
    _check_fopru(x, s, [33], "row", 50)     # 2 rows of 50: the partial row streams


def test_selection_rejects_bad_input():
    s = torch.randn(2, 16, device=DEVICE)
    x = torch.randn(2, 16, 4, device=DEVICE)
    for k in (0, 17, -1):
        with pytest.raises(ValueError):
            TSel.topk_indices(s, k)
    with pytest.raises(ValueError):
        TSel.topk_indices(s.int(), 3)
    with pytest.raises(ValueError):
        TSel.topk_indices(s[0], 3)
    bad_calls = [
        (x, s, 0, "rank", 0), (x, s, 17, "rank", 0), (x, s, 4, "best", 0),
        (x, s, 4, "row", 3), (x, s, 4, "row", -1), (x[:, :15], s, 4, "rank", 0),
        (x[:1], s, 4, "rank", 0), (x, s.int(), 4, "rank", 0),
    ]
    for args in bad_calls:
        with pytest.raises(ValueError):
            TSel.fopru_select(*args)
    with pytest.raises(ValueError):  # not a square: grid_width is needed
        TSel.fopru_select(x[:, :15], s[:, :15], 4, "row", 0)


# --- device guard, host waits ----------------------------------------------------------------

def _every_launcher(dev=DEVICE, seed=0):
    """One call of every public Triton launcher on small inputs, as (name, thunk)."""
    g = _gen(seed)
    q, k = (torch.randn(2, 17, 32, generator=g).to(dev) for _ in range(2))
    s = torch.randn(2, 16, generator=g).to(dev)
    x = torch.randn(2, 16, 8, generator=g).to(dev)
    keys = torch.randn(2, 16, 8, generator=g).to(dev)
    idx = torch.randint(0, 16, (2, 5), generator=g).to(dev)
    return [
        ("cls_attention", lambda: TS.cls_attention(q, k, 2)),
        ("attention_received", lambda: TS.attention_received(q, k, 2)),
        ("fopru_significance", lambda: TS.fopru_significance(q, k, 2)),
        ("topk_indices", lambda: TSel.topk_indices(s, 5)),
        ("gather_tokens", lambda: TSel.gather_tokens(x, idx)),
        ("fopru_select", lambda: TSel.fopru_select(x, s, 6, "row")),
        ("fopru_select", lambda: TSel.fopru_select(x, s, 6, "rank")),
        ("vispruner_select", lambda: TP.vispruner_select(x, s, 6)),
        ("prumerge", lambda: TP.prumerge(x, keys, s, 4, True)),
    ]


def _kernel_names():
    return sorted(f"{m.__name__}.{n}" for m in (TS, TSel, TP) for n in vars(m) if n.endswith("_kernel"))


def test_device_guard_enters_cuda_devices_only(monkeypatch):
    entered = []

    class FakeCudaDevice:  # torch.cuda.device without a GPU: records what it is entered with
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(torch.cuda, "device", FakeCudaDevice)
    with _launch.device_guard(torch.device("cuda", 1)):
        assert entered == [torch.device("cuda", 1)]
    assert entered == [torch.device("cuda", 1), "exit"]
    for dev in (torch.device("cpu"), torch.device("meta"), None):
        with _launch.device_guard(dev):
            pass
    assert entered == [torch.device("cuda", 1), "exit"]


def test_every_kernel_launches_under_the_inputs_device_guard(monkeypatch):
    """Every launcher enters device_guard(its inputs' device) once, and every kernel launch of
    every launcher happens inside it."""
    guards, launches, depth = [], [], [0]

    @contextlib.contextmanager
    def guard(device):
        guards.append(device)
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    class Spy:
        def __init__(self, name, real):
            self.name, self.real = name, real

        def __getitem__(self, grid):
            launches.append((self.name, depth[0]))
            return self.real[grid]

    monkeypatch.setattr(_launch, "device_guard", guard)
    for mod in (TS, TSel, TP):
        for n in [n for n in vars(mod) if n.endswith("_kernel")]:
            monkeypatch.setattr(mod, n, Spy(f"{mod.__name__}.{n}", getattr(mod, n)))
    calls = _every_launcher()
    for name, call in calls:
        n_guards = len(guards)
        call()
        assert len(guards) == n_guards + 1, name
    assert guards == [torch.empty(0, device=DEVICE).device] * len(calls)
    assert sorted({n for n, _ in launches}) == _kernel_names()
    assert all(d == 1 for _, d in launches), launches


def test_launchers_reject_tensors_on_different_devices():
    """The device check names the arguments and comes before any launch (meta: no GPU needed)."""
    g = _gen(1)
    q, k = torch.randn(2, 17, 32, generator=g), torch.randn(2, 17, 32, generator=g)
    s, x = torch.randn(2, 16, generator=g), torch.randn(2, 16, 8, generator=g)
    idx = torch.zeros(2, 5, dtype=torch.int64)
    m = lambda t: t.to("meta")  # noqa: E731
    cases = [
        (lambda: TS.cls_attention(q, m(k), 2), "k on meta"),
        (lambda: TS.attention_received(m(q), k, 2), "q on meta"),
        (lambda: TS.fopru_significance(q, m(k), 2), "k on meta"),
        (lambda: TSel.gather_tokens(x, m(idx)), "indices on meta"),
        (lambda: TSel.fopru_select(m(x), s, 6, "row"), "x on meta"),
        (lambda: TP.vispruner_select(x, m(s), 6), "scores on meta"),
        (lambda: TP.prumerge(x, m(x), s), "keys on meta"),
    ]
    for call, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call()


class _HostReads(TorchDispatchMode):
    """Counts reads of device values by the host: item()/int()/bool() (aten._local_scalar_dense)
    and tolist() (patched: on CPU tensors it dispatches nothing)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.count = 0
        tolist = torch.Tensor.tolist

        def counting_tolist(t):
            self.count += 1
            return tolist(t)

        monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_host_waits_per_launcher(monkeypatch):
    """gather_tokens waits once (its range check), prumerge once (its output size), the rest never
    (on CUDA also under torch's sync debug mode, which sees every synchronising torch call)."""
    allowed = {"gather_tokens": 1, "prumerge": 1}
    for name, call in _every_launcher():
        call()  # warm-up: compiles the kernels
        with _HostReads(monkeypatch) as reads:
            call()
        assert reads.count == allowed.get(name, 0), (name, reads.count)
        if DEVICE == "cuda" and name not in allowed:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                call()
            finally:
                torch.cuda.set_sync_debug_mode("default")


def test_no_host_wait_while_capturing(monkeypatch):
    """Under CUDA graph capture (simulated) gather_tokens skips its range check (an index outside
    [0, N) gives a zero row, never a read outside x) and prumerge refuses before waiting."""
    monkeypatch.setattr(_launch, "capturing", lambda t: True)
    g = _gen(3)
    x = torch.randn(2, 7, 16, generator=g)
    idx = torch.tensor([[0, -1, 6], [7, 1 << 40, 2]])
    with _HostReads(monkeypatch) as reads:
        got = TSel.gather_tokens(x.to(DEVICE), idx.to(DEVICE))
    assert reads.count == 0
    got = got.cpu()
    assert torch.equal(got[0, 0], x[0, 0]) and torch.equal(got[0, 2], x[0, 6])
    assert torch.equal(got[1, 2], x[1, 2])
    assert not got[0, 1].any() and not got[1, 0].any() and not got[1, 1].any()
    s = torch.randn(2, 7, generator=g).to(DEVICE)
    with _HostReads(monkeypatch) as reads:
        with pytest.raises(RuntimeError, match="CUDA graph"):
            TP.prumerge(x.to(DEVICE), x.to(DEVICE), s)
    assert reads.count == 0


def test_gather_range_check_reports_the_bounds():
    x = torch.randn(1, 10, 4, device=DEVICE)
    idx = torch.tensor([[3, -2, 12]], device=DEVICE)
    with pytest.raises(ValueError, match=r"\[0, N\) with N=10, got values in \[-2, 12\]"):
        TSel.gather_tokens(x, idx)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launchers_run_on_the_inputs_device():
    """Inputs on cuda:1 while cuda:0 is current: every launcher computes on cuda:1 (the results
    equal the same call on cuda:0) and leaves cuda:0 current."""
    torch.cuda.set_device(0)
    on0, on1 = _every_launcher("cuda:0", seed=4), _every_launcher("cuda:1", seed=4)
    for (name, call0), (_, call1) in zip(on0, on1):
        want, got = call0(), call1()
        torch.cuda.synchronize(1)
        assert torch.cuda.current_device() == 0, name
        want = want if isinstance(want, tuple) else (want,)
        got = got if isinstance(got, tuple) else (got,)
        for w, o in zip(want, got):
            assert o.device == torch.device("cuda", 1), name
            if o.is_floating_point():  # the same kernels, but cuda:1 may be another GPU model
                torch.testing.assert_close(o.cpu(), w.cpu(), **TOL[torch.float32], msg=name)
            else:
                assert torch.equal(o.cpu(), w.cpu()), name
    q = torch.randn(1, 5, 8, device="cuda:0")
    with pytest.raises(ValueError, match="k on cuda:1"):
        TS.cls_attention(q, q.to("cuda:1"), 2)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA device")
def test_launchers_in_cuda_graph():
    """Captured once, replayed on new inputs: the Triton launchers wait for nothing on the host
    (gather_tokens' range check is skipped under capture); prumerge refuses to be captured."""
    B, T, C, H, N, D = 2, 577, 128, 2, 576, 32
    g = _gen(21)
    q, k = torch.randn(B, T, C, generator=g).cuda(), torch.randn(B, T, C, generator=g).cuda()
    s, x = torch.randn(B, N, generator=g).cuda(), torch.randn(B, N, D, generator=g).cuda()
    idx = torch.randint(0, N, (B, 50), generator=g).cuda()

    def step():
        return (TS.cls_attention(q, k, H), TS.attention_received(q, k, H), TS.fopru_significance(q, k, H),
                TSel.topk_indices(s, 100), TSel.gather_tokens(x, idx), *TSel.fopru_select(x, s, 100, "row"),
                TP.vispruner_select(x, s, 64))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiles every kernel before the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in range(2):
        g = _gen(200 + seed)
        new = [torch.randn(B, T, C, generator=g), torch.randn(B, T, C, generator=g),
               torch.randn(B, N, generator=g), torch.randn(B, N, D, generator=g),
               torch.randint(0, N, (B, 50), generator=g)]
        for dst, src in zip((q, k, s, x, idx), new):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        qc, kc, sc, xc, ic = new
        for got, name in zip(out[:3], SCORING_OPS):
            torch.testing.assert_close(got.cpu(), getattr(ref, name)(qc, kc, H), **TOL[torch.float32])
        assert torch.equal(out[3].cpu(), ref.topk_indices(sc, 100))
        assert torch.equal(out[4].cpu(), ref.gather_tokens(xc, ic))
        want_x, want_i = ref.fopru_select(xc, sc, 100, "row")
        assert torch.equal(out[5].cpu(), want_x) and torch.equal(out[6].cpu(), want_i)
        # float32 VisPruner may resolve near-ties unlike the reference (SPEC.md): the replay must
        # equal the same launcher run eagerly on the same inputs.
        assert torch.equal(out[7], TP.vispruner_select(x, s, 64))
    with pytest.raises(RuntimeError, match="CUDA graph"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            TP.prumerge(x, x, s)
