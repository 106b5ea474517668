"""The GlimpsePrune ops, glimpse_logits and gather_cache, on every backend against
vtkernels.reference (and against by-hand expectations where the reference itself is on trial).

Backends: "cpu" is the dispatcher on CPU tensors (the C++ kernels of csrc/cpu/glimpse_cpu.cpp);
"triton" calls vtkernels/triton/glimpse.py directly, under TRITON_INTERPRET=1 on CPU tensors
without a GPU (conftest.py sets it), on CUDA tensors with one. The gpu-marked tests at the end
run the dispatcher on CUDA (CUDA C++ gather_cache when the extension was built with CUDA, else
Triton), CUDA graph capture and replay included; they skip without a GPU.
"""
import os

if "TRITON_INTERPRET" not in os.environ:  # before any Triton kernel is defined
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from torch.testing import assert_close

import vtkernels
from vtkernels import ops
from vtkernels import reference as ref

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")
TRITON_DEVICE = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else None)

try:
    from vtkernels.triton import glimpse as TG
except Exception as e:  # pragma: no cover - triton missing
    TG = None
    _triton_error = str(e)

# inf - inf in a fully masked row is a NaN on purpose before it is masked; numpy warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Scores are float32. float64 inputs compute in float64 and round once: within 1 ulp of the
# reference's float32. Lower precisions are compared with the reference in float64 on the same
# (already rounded) inputs: products of 16-bit values are exact in float32, so only float32
# accumulation error is allowed, not the input rounding.
TOL = {
    torch.float64: dict(rtol=2.0 ** -23, atol=0.0),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-5, atol=1e-5),
}


def _backends():
    out = ["cpu"]
    if TG is not None and TRITON_DEVICE is not None:
        out.append("triton")
    return out


BACKENDS = _backends()


def _device(backend):
    return "cpu" if backend == "cpu" else TRITON_DEVICE


def _glimpse(backend):
    return ops.glimpse_logits if backend == "cpu" else TG.glimpse_logits


def _gather(backend):
    return ops.gather_cache if backend == "cpu" else TG.gather_cache


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_compiled_kernels_serve_the_cpu():
    assert vtkernels.extension_error is None, vtkernels.extension_error
    for name in ("glimpse_logits", "gather_cache"):
        assert vtkernels.backend_of(name, "CPU") == "compiled", name


# --- glimpse_logits ----------------------------------------------------------------------------

def _keys(B, Hkv, L, D, dtype, layout, g, device):
    """k [B, Hkv, L, D] with the values of a float64 draw, in one of the layouts a cache has."""
    if layout == "slice":  # the first L positions of a preallocated [B, Hkv, Lmax, D] cache
        buf = torch.randn(B, Hkv, L + 9, D, generator=g, dtype=torch.float64).to(dtype).to(device)
        return buf[:, :, 3:3 + L]
    if layout == "transposed":  # a [B, L, Hkv, D] cache seen as [B, Hkv, L, D]
        return torch.randn(B, L, Hkv, D, generator=g, dtype=torch.float64).to(dtype).to(device).transpose(1, 2)
    if layout == "strided_d":  # every other channel of a wider buffer: not even D is contiguous
        return torch.randn(B, Hkv, L, 2 * D, generator=g, dtype=torch.float64).to(dtype).to(device)[..., ::2]
    return torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64).to(dtype).to(device)


def _queries(B, Hq, D, dtype, g, device, strided=False):
    if strided:  # the glimpse's row of a [B, Hq, T, D] query tensor (the last position)
        return torch.randn(B, Hq, 3, D, generator=g, dtype=torch.float64).to(dtype).to(device)[:, :, -1]
    return torch.randn(B, Hq, D, generator=g, dtype=torch.float64).to(dtype).to(device)


def _mask(B, L, g, device):
    """Random keys masked; row 0 fully masked (B > 1), the last row keeps one key only."""
    m = torch.rand(B, L, generator=g) > 0.3
    if B > 1:
        m[0] = False
    m[-1] = False
    m[-1, (L - 1) // 2] = True
    return m.to(device)


def _check_glimpse(got, want, dtype):
    assert got.dtype == torch.float32 and got.shape == want.shape
    # -inf exactly where the reference has it (masked keys, fully masked rows), close elsewhere
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    assert_close(got, want, **TOL[dtype])


SHAPES = [  # (B, Hq, Hkv, L, D)
    (1, 4, 4, 1, 64),
    (3, 8, 2, 7, 80),
    (1, 8, 1, 130, 128),
    (3, 4, 1, 701, 64),
    (1, 6, 6, 130, 80),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Hq{}-Hkv{}-L{}-D{}".format(*s))
def test_glimpse_logits(backend, dtype, shape):
    B, Hq, Hkv, L, D = shape
    dev = _device(backend)
    g = _gen(L * 31 + D)
    layout = ("contiguous", "slice", "transposed", "strided_d")[(L + D) % 4]
    q = _queries(B, Hq, D, dtype, g, dev, strided=(L % 2 == 1))
    k = _keys(B, Hkv, L, D, dtype, layout, g, dev)
    mask = _mask(B, L, g, dev)
    fn = _glimpse(backend)
    qd, kd = q.double().cpu(), k.double().cpu()
    for scale, key_mask, ls in [(None, None, False), (None, None, True), (0.3, mask, True), (None, mask, False)]:
        want = ref.glimpse_logits(qd, kd, scale, None if key_mask is None else key_mask.cpu(), ls)
        got = fn(q, k, scale, key_mask, ls).cpu()
        _check_glimpse(got, want, dtype)
        if ls and key_mask is not None:
            if B > 1:
                assert torch.isneginf(got[0]).all()  # fully masked row: all -inf
            # one key left: log-softmax 0 there, -inf elsewhere
            assert (got[-1, :, (L - 1) // 2] == 0).all()
            assert torch.isneginf(got[-1]).sum() == Hq * (L - 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "slice", "transposed", "strided_d"])
def test_glimpse_logits_layouts_agree_bitwise(backend, layout):
    # The same values in any layout give the same bits (the kernel's order of summation does not
    # depend on strides).
    B, Hq, Hkv, L, D = 2, 8, 2, 37, 80
    dev = _device(backend)
    q = _queries(B, Hq, D, torch.float32, _gen(1), dev)
    k = _keys(B, Hkv, L, D, torch.float32, layout, _gen(2), dev)
    fn = _glimpse(backend)
    for ls in (False, True):
        assert torch.equal(fn(q, k, None, None, ls), fn(q, k.contiguous(), None, None, ls))


@pytest.mark.parametrize("backend", BACKENDS)
def test_glimpse_gqa_mapping_by_hand(backend):
    # Query head h reads key head h // (Hq / Hkv), written out with loops, independently of the
    # reference's repeat_interleave.
    B, Hq, Hkv, L, D = 2, 8, 2, 5, 16
    dev = _device(backend)
    q = _queries(B, Hq, D, torch.float64, _gen(3), dev)
    k = _keys(B, Hkv, L, D, torch.float64, "contiguous", _gen(4), dev)
    got = _glimpse(backend)(q, k, 0.5, None, False).cpu()
    qc, kc = q.cpu(), k.cpu()
    for b in range(B):
        for h in range(Hq):
            for l in range(L):
                want = float((qc[b, h] * kc[b, h // 4, l]).sum()) * 0.5
                assert got[b, h, l].item() == pytest.approx(want, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_glimpse_log_softmax_by_hand(backend):
    # Masked log-softmax of a known row: keys 0 and 2 kept with logits 1 and 3 -> log(e/(e+e^3)).
    dev = _device(backend)
    q = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64, device=dev)            # [1, 1, 2]
    k = torch.tensor([[[[1.0, 5.0], [2.0, 0.0], [3.0, 1.0]]]], dtype=torch.float64, device=dev)
    mask = torch.tensor([[True, False, True]], device=dev)
    got = _glimpse(backend)(q, k, 1.0, mask, True).cpu()
    lse = torch.logsumexp(torch.tensor([1.0, 3.0], dtype=torch.float64), 0)
    assert_close(got[0, 0], torch.tensor([1.0 - lse, -float("inf"), 3.0 - lse]).float(), rtol=2.0 ** -23, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_glimpse_empty_and_float8(backend):
    dev = _device(backend)
    fn = _glimpse(backend)
    assert fn(torch.randn(2, 4, 8, device=dev), torch.randn(2, 2, 0, 8, device=dev), None, None, True).shape == (2, 4, 0)
    assert fn(torch.randn(0, 4, 8, device=dev), torch.randn(0, 2, 5, 8, device=dev)).shape == (0, 4, 5)
    if backend == "triton" and not INTERPRET:
        return  # float8 on GPU is covered by the same upcast; the interpreter run checks it
    q = torch.randn(2, 4, 16, generator=_gen(5)).to(torch.float8_e4m3fn).to(dev)
    k = torch.randn(2, 2, 9, 16, generator=_gen(6)).to(torch.float8_e4m3fn).to(dev)
    want = ref.glimpse_logits(q.double().cpu(), k.double().cpu(), None, None, True)
    _check_glimpse(fn(q, k, None, None, True).cpu(), want, torch.float32)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton unavailable")
def test_glimpse_triton_gpu_tiles_under_the_interpreter(monkeypatch):
    # The interpreter normally runs big tiles; here the GPU configuration (several key blocks,
    # head_dim looped in chunks) runs too, for every dtype's budget.
    monkeypatch.setattr(TG, "_interpreting", lambda: False)
    B, Hq, Hkv, L, D = 2, 16, 2, 70, 80
    for dtype in DTYPES:
        cfg = TG._glimpse_logits_config(Hq // Hkv, L, D, dtype)
        assert cfg["BLOCK_D"] < D and cfg["BLOCK_L"] < L  # the loops really run
        g = _gen(7)
        q = _queries(B, Hq, D, dtype, g, TRITON_DEVICE)
        k = _keys(B, Hkv, L, D, dtype, "slice", g, TRITON_DEVICE)
        mask = _mask(B, L, g, TRITON_DEVICE)
        want = ref.glimpse_logits(q.double().cpu(), k.double().cpu(), None, mask.cpu(), True)
        _check_glimpse(TG.glimpse_logits(q, k, None, mask, True).cpu(), want, dtype)


# --- gather_cache ------------------------------------------------------------------------------

# Values whose bits a gather must keep: NaN, infinities, -0.0, subnormals.
SPECIAL = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, -3e-39, 1.5], dtype=torch.float64)
INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _fill(shape, dtype, g):
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    flat = x.view(-1)
    pos = torch.randint(0, flat.numel(), (max(1, flat.numel() // 7),), generator=g)
    flat[pos] = SPECIAL[torch.randint(0, len(SPECIAL), pos.shape, generator=g)]
    return x.to(dtype)


def _cache_tensors(B, L, device, g):
    """Tensors of one cache list: different dtypes, middle dims, D, and layouts."""
    ts = [
        _fill((B, 4, L, 64), torch.float32, g),                                   # contiguous K
        _fill((B, 2, L + 5, 80), torch.bfloat16, g)[:, :, 2:2 + L],               # slice of a bigger cache
        _fill((B, L, 3, 128), torch.float16, g).transpose(1, 2),                  # [B, L, H, D] layout
        _fill((B, L, 24), torch.float64, g),                                      # no middle dims
        _fill((B, 3, 2, L, 8), torch.float32, g).transpose(1, 2),                 # middle dims not collapsible
        _fill((B, 2, L, 24), torch.bfloat16, g)[..., ::2],                        # strided D
        _fill((B, 1, 2, L, 6), torch.float16, g)[:, :, :, :, 1:],                 # odd row bytes, size-1 dim
    ]
    ts.append(torch.randn(B, 2, L, 16, generator=g).to(torch.float8_e4m3fn))     # 1-byte elements
    return [t.to(device) for t in ts]


def _index(kind, B, L, M, g):
    if kind == "random":  # -1 anywhere, repeats, any order
        return torch.randint(-1, L, (B, M), generator=g)
    if kind == "reversed":
        return torch.arange(L - 1, -1, -1).repeat(B, 1)[:, :M] if M <= L else torch.randint(0, L, (B, M), generator=g)
    if kind == "pad":
        return torch.full((B, M), -1, dtype=torch.int64)
    if kind == "sorted":
        return torch.stack([torch.randperm(L, generator=g)[:M].sort().values for _ in range(B)])
    raise ValueError(kind)


def _by_hand(tensors, index):
    """out[b, ..., m, :] = t[b, ..., index[b, m], :], zeros for -1, with loops."""
    outs = []
    for t in tensors:
        o = torch.zeros((*t.shape[:-2], index.shape[1], t.shape[-1]), dtype=t.dtype)
        for b in range(index.shape[0]):
            for m, i in enumerate(index[b].tolist()):
                if i >= 0:
                    o[b, ..., m, :] = t[b, ..., i, :]
        outs.append(o)
    return outs


def _bits(t):
    return t.contiguous().view(INT_VIEW[t.element_size()])


def _check_gather(got, want, tensors):
    assert len(got) == len(want) == len(tensors)
    for o, w, t in zip(got, want, tensors):
        assert o.dtype == t.dtype and o.shape == w.shape and o.is_contiguous()
        assert torch.equal(_bits(o.cpu()), _bits(w.cpu()))  # bit-exact, NaN payloads included


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,L,M,kind", [
    (1, 1, 3, "random"), (3, 7, 5, "random"), (2, 130, 300, "random"), (1, 701, 350, "sorted"),
    (3, 7, 7, "reversed"), (2, 9, 4, "pad"), (2, 5, 0, "random"),
])
def test_gather_cache(backend, B, L, M, kind):
    dev = _device(backend)
    g = _gen(B * 1000 + L + M)
    tensors = _cache_tensors(B, L, dev, g)
    index = _index(kind, B, L, M, g)
    got = _gather(backend)(tensors, index.to(dev))
    _check_gather(got, ref.gather_cache([t.cpu() for t in tensors], index), tensors)
    if M == 0:
        assert all(o.numel() == 0 for o in got)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_gather_cache_by_hand(backend):
    # Against loops, not the reference: the reference is on trial too here.
    dev = "cpu" if backend == "reference" else _device(backend)
    fn = ref.gather_cache if backend == "reference" else _gather(backend)
    g = _gen(11)
    tensors = _cache_tensors(2, 6, dev, g)
    index = torch.tensor([[5, -1, 0, 0, 3, 5, -1], [-1, -1, 2, 1, 4, 0, 5]])
    _check_gather(fn(tensors, index.to(dev)), _by_hand([t.cpu() for t in tensors], index), tensors)
    # Non-contiguous index (a column slice), and no sequence at all (every slot padding).
    wide = torch.tensor([[0, 9, 3, 9, -1, 9], [5, 9, 5, 9, 1, 9]])[:, ::2]
    _check_gather(fn(tensors, wide.to(dev)), _by_hand([t.cpu() for t in tensors], wide), tensors)
    empty = [torch.randn(2, 3, 0, 4, device=dev), torch.randn(2, 0, 5, device=dev).half()]
    out = fn(empty, torch.full((2, 3), -1, device=dev))
    assert [tuple(o.shape) for o in out] == [(2, 3, 3, 4), (2, 3, 5)] and all((o == 0).all() for o in out)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton unavailable")
def test_gather_cache_triton_gpu_tiles_under_the_interpreter(monkeypatch):
    # The GPU tile (several row blocks per tensor, rows looped in unit chunks) under the interpreter.
    monkeypatch.setattr(TG, "_interpreting", lambda: False)
    g = _gen(12)
    tensors = _cache_tensors(2, 40, TRITON_DEVICE, g) + [_fill((2, 1, 40, 264), torch.float32, g).to(TRITON_DEVICE)]
    index = _index("random", 2, 40, 60, g)
    assert TG._gather_cache_config(2 * 60 * 132)["BLOCK"] < 2 * 60 * 132  # several programs per tensor
    _check_gather(TG.gather_cache(tensors, index.to(TRITON_DEVICE)), ref.gather_cache([t.cpu() for t in tensors], index),
                  tensors)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton unavailable")
def test_gather_cache_triton_copy_units():
    # The widest unit that tiles a row and keeps it aligned; element by element for strided D.
    t = torch.zeros(2, 4, 8, 64)
    out = torch.empty(2, 4, 3, 64)
    assert TG._unit_bytes(t, *t.stride()[:1], 8 * 64, 64, out) == (8, 1, 32)
    h = torch.zeros(2, 4, 8, 3, dtype=torch.float16)
    assert TG._unit_bytes(h, 96, 24, 3, torch.empty(2, 4, 3, 3, dtype=torch.float16))[0] == 2
    s = torch.zeros(2, 4, 8, 6, dtype=torch.bfloat16)[..., ::2]
    assert TG._unit_bytes(s, 192, 48, 6, torch.empty(2, 4, 3, 3, dtype=torch.bfloat16)) == (2, 2, 3)


# --- bad input: ValueError naming the argument, on every backend ----------------------------------

def _r(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


_IDX = torch.tensor([[0, -1], [2, 1]])
BAD = [
    ("glimpse_logits", lambda: (_r(2, 4), _r(2, 2, 5, 8)), "q must be"),
    ("glimpse_logits", lambda: (_r(2, 4, 8), _r(2, 5, 8)), "k must be"),
    ("glimpse_logits", lambda: (_r(2, 6, 8), _r(2, 4, 5, 8)), "multiple of"),
    ("glimpse_logits", lambda: (_r(2, 4, 8), _r(3, 2, 5, 8)), "batch"),
    ("glimpse_logits", lambda: (_r(2, 4, 8), _r(2, 2, 5, 6)), "head_dim"),
    ("glimpse_logits", lambda: (_r(2, 4, 8), _r(2, 2, 5, 8, dtype=torch.float64)), "same dtype"),
    ("glimpse_logits", lambda: (torch.ones(2, 4, 8, dtype=torch.int64), torch.ones(2, 2, 5, 8, dtype=torch.int64)),
     "q must be a floating-point"),
    ("glimpse_logits", lambda: (_r(2, 4, 8), _r(2, 2, 5, 8), float("inf")), "scale"),
    ("glimpse_logits", lambda: (_r(2, 4, 8), _r(2, 2, 5, 8), None, torch.ones(2, 4, dtype=torch.bool), True),
     "key_mask must be [B, L]"),
    ("glimpse_logits", lambda: (_r(2, 4, 8), _r(2, 2, 5, 8), None, torch.ones(2, 5), True), "key_mask must be bool"),
    ("gather_cache", lambda: ([], _IDX), "non-empty list"),
    ("gather_cache", lambda: ([_r(2, 3, 4, 5)], _IDX.int()), "index must be int64"),
    ("gather_cache", lambda: ([_r(2, 3, 4, 5)], _IDX[0]), "index must be [B, M]"),
    ("gather_cache", lambda: ([_r(2, 3, 4, 5), _r(3, 3, 4, 5)], _IDX), "tensors[1] has batch 3"),
    ("gather_cache", lambda: ([_r(2, 3, 4, 5), _r(2, 3, 6, 5)], _IDX), "tensors[1] has sequence length 6"),
    ("gather_cache", lambda: ([_r(2, 3, 4, 5), torch.ones(2, 4, 5, dtype=torch.int32)], _IDX),
     "tensors[1] must be a floating-point"),
    ("gather_cache", lambda: ([_r(2, 4)], _IDX), "tensors[0] must be [B, ..., L, D]"),
    ("gather_cache", lambda: ([_r(2, 3, 4, 5)], torch.tensor([[0, 4], [2, 1]])), "index must lie in [-1, L)"),
    ("gather_cache", lambda: ([_r(2, 3, 4, 5)], torch.tensor([[0, -2], [2, 1]])), "index must lie in [-1, L)"),
]


def _to(x, dev):
    if isinstance(x, torch.Tensor):
        return x.to(dev)
    if isinstance(x, list):
        return [_to(v, dev) for v in x]
    return x


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("case", BAD, ids=lambda c: f"{c[0]}-{c[2]}")
def test_bad_input(case, backend):
    name, make, words = case
    if backend == "reference":
        fn, dev = getattr(ref, name), "cpu"
    else:
        fn, dev = (_glimpse if name == "glimpse_logits" else _gather)(backend), _device(backend)
    with pytest.raises(ValueError) as e:
        fn(*_to(make(), dev))
    assert words in str(e.value), str(e.value)


# --- dispatcher: opcheck, torch.compile ---------------------------------------------------------

def _opcheck_samples():
    g = _gen(13)
    q = _queries(2, 8, 16, torch.float32, g, "cpu", strided=True)
    k = _keys(2, 2, 9, 16, torch.float32, "slice", g, "cpu")
    mask = _mask(2, 9, g, "cpu")
    # Plain values: opcheck compares outputs with assert_close, under which NaN != NaN.
    tensors = [torch.randn(2, 2, 9, 16, generator=g), torch.randn(2, 9, 3, 8, generator=g).bfloat16().transpose(1, 2),
               torch.randn(2, 9, 4, generator=g, dtype=torch.float64)]
    idx = torch.tensor([[0, -1, 8, 3], [2, 2, -1, 0]])
    return [
        ("glimpse_logits", (q, k), {}),
        ("glimpse_logits", (q.double(), k.double(), 0.2, mask, True), {}),
        ("glimpse_logits", (q.half(), k.half()), {"log_softmax": True}),
        ("gather_cache", ([t for t in tensors], idx), {}),
    ]


@pytest.mark.parametrize("case", _opcheck_samples(), ids=lambda c: c[0])
def test_opcheck(case):
    name, args, kwargs = case
    torch.library.opcheck(getattr(torch.ops.vtk, name).default, args, kwargs)


def test_torch_compile_fullgraph():
    def prune(q, k, v, mask):
        lp = ops.glimpse_logits(q, k, None, mask, True)
        keep = lp.mean(dim=1).topk(5, dim=1).indices.sort(dim=1).values
        kk, vv = ops.gather_cache([k, v], keep)
        return lp, kk * 2, vv

    g = _gen(14)
    q = _queries(2, 8, 16, torch.float32, g, "cpu")
    k = _keys(2, 2, 11, 16, torch.float32, "contiguous", g, "cpu")
    v = _keys(2, 2, 11, 16, torch.float32, "transposed", g, "cpu")
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 3] = False
    compiled = torch.compile(prune, fullgraph=True, backend="inductor")
    for got, want in zip(compiled(q, k, v, mask), prune(q, k, v, mask)):
        assert torch.equal(got, want)


# --- CUDA (GPU only) ----------------------------------------------------------------------------

def _extension_has_cuda_gather() -> bool:
    if vtkernels.extension_error is not None:
        return False
    import vtkernels._C as C
    with open(C.__file__, "rb") as f:
        return b"gather_cache_kernel" in f.read()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Hq{}-Hkv{}-L{}-D{}".format(*s))
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_glimpse_logits(dtype, shape):
    B, Hq, Hkv, L, D = shape
    g = _gen(15)
    q = _queries(B, Hq, D, dtype, g, "cuda", strided=True)
    k = _keys(B, Hkv, L, D, dtype, "slice", g, "cuda")
    mask = _mask(B, L, g, "cuda")
    for ls, km in ((False, None), (True, None), (True, mask)):
        want = ref.glimpse_logits(q.double().cpu(), k.double().cpu(), None, None if km is None else km.cpu(), ls)
        _check_glimpse(ops.glimpse_logits(q, k, None, km, ls).cpu(), want, dtype)


@pytest.mark.parametrize("B,L,M", [(1, 1, 3), (3, 130, 300), (1, 701, 350), (2, 5, 0)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gather_cache(B, L, M):
    g = _gen(16)
    tensors = _cache_tensors(B, L, "cuda", g)
    index = _index("random", B, L, M, g)
    _check_gather(ops.gather_cache(tensors, index.cuda()), ref.gather_cache([t.cpu() for t in tensors], index), tensors)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gather_cache_many_tensors_and_backend():
    if _extension_has_cuda_gather():
        assert vtkernels.backend_of("gather_cache", "CUDA") == "compiled"
    # More tensors than the small by-value table holds (60), and than one large table (480).
    g = _gen(17)
    for n in (61, 481):
        tensors = [torch.randn(1, 2, 9, 8, generator=g).cuda() for _ in range(n)]
        index = torch.tensor([[8, -1, 0, 4]], device="cuda")
        _check_gather(ops.gather_cache(tensors, index), ref.gather_cache([t.cpu() for t in tensors], index.cpu()),
                      tensors)


def _capture(fn):
    """Captures fn() into a CUDA graph after a warm-up on a side stream; returns (graph, outputs)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.parametrize("backend", ["dispatcher", "triton"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_capture_and_replay(backend):
    g = _gen(18)
    q = _queries(2, 8, 64, torch.bfloat16, g, "cuda")
    k = _keys(2, 2, 40, 64, torch.bfloat16, "slice", g, "cuda")
    v = _keys(2, 2, 40, 64, torch.bfloat16, "transposed", g, "cuda")
    mask = _mask(2, 40, g, "cuda")
    index = torch.randint(-1, 40, (2, 17), generator=g).cuda()
    glimpse = ops.glimpse_logits if backend == "dispatcher" else TG.glimpse_logits
    gather = ops.gather_cache if backend == "dispatcher" else TG.gather_cache

    def step():
        return glimpse(q, k, None, mask, True), gather([k, v], index)

    graph, (lp, (kk, vv)) = _capture(step)
    for _ in range(2):  # new inputs in place, then replay
        q.copy_(torch.randn(q.shape, generator=g).to(q))
        index.copy_(torch.randint(-1, 40, index.shape, generator=g))
        graph.replay()
        torch.cuda.synchronize()
        want = ref.glimpse_logits(q.double().cpu(), k.double().cpu(), None, mask.cpu(), True)
        _check_glimpse(lp.cpu(), want, torch.bfloat16)
        _check_gather([kk, vv], ref.gather_cache([k.cpu(), v.cpu()], index.cpu()), [k, v])
    # Inside a graph the range check (a host wait) is skipped: out-of-range slots come out as zeros.
    index.copy_(torch.tensor([[40, 0] * 8 + [1000], [-5, 1] * 8 + [39]]))
    graph.replay()
    torch.cuda.synchronize()
    assert (kk[0, :, ::2] == 0).all() and (kk[1, :, 0:16:2] == 0).all()
    assert torch.equal(kk[0, :, 1], k[0, :, 0]) and torch.equal(kk[1, :, -1], k[1, :, 39])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_torch_compile_fullgraph():
    g = _gen(19)
    q = _queries(2, 8, 64, torch.float16, g, "cuda")
    k = _keys(2, 2, 40, 64, torch.float16, "slice", g, "cuda")

    def f(q, k):
        lp = ops.glimpse_logits(q, k, None, None, True)
        keep = lp.mean(dim=1).topk(9, dim=1).indices
        return lp, ops.gather_cache([k], keep)[0]

    for got, want in zip(torch.compile(f, fullgraph=True)(q, k), f(q, k)):
        assert torch.equal(got, want)
