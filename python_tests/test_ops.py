"""The vtk ops through the dispatcher (C++ kernels on the CPU) against vtkernels.reference.

Triton kernels are tested in test_triton.py (interpreter), CUDA ones in test_cuda.py (GPU only).
"""
import math

import pytest
import torch
from torch.testing import assert_close

import vtkernels
from vtkernels import ops
from vtkernels import reference as ref
from vtkernels._schemas import SCHEMAS

# (atol, rtol) for float32 scores computed from inputs of each dtype, against a float32/64 reference
TOL = {torch.float64: (1e-12, 1e-9), torch.float32: (1e-6, 1e-4), torch.float16: (1e-6, 1e-4),
       torch.bfloat16: (1e-6, 1e-4)}
SCORE_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def make_qk(B, T, C, dtype, seed=0, fused=False, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    if fused:  # non-contiguous views of a fused qkv projection output
        qkv = (torch.randn(B, T, 3 * C, generator=g, dtype=torch.float64) * spread).to(dtype)
        return qkv[..., :C], qkv[..., C:2 * C]
    q = (torch.randn(B, T, C, generator=g, dtype=torch.float64) * spread).to(dtype)
    k = (torch.randn(B, T, C, generator=g, dtype=torch.float64) * spread).to(dtype)
    return q, k


def ref_scores(fn, q, k, *args, **kw):
    # Reference on the same (rounded) values, in float64, so only the kernel's own error is measured.
    return fn(q.double(), k.double(), *args, **kw)


def test_compiled_library_in_use():
    assert vtkernels.extension_error is None, vtkernels.extension_error
    for name in SCHEMAS:
        assert vtkernels.backend_of(name, "CPU") == "compiled"


def test_schemas_match_compiled_library():
    for name, schema in SCHEMAS.items():
        got = str(getattr(torch.ops.vtk, name).default._schema)
        assert got == "vtk::" + schema


@pytest.mark.parametrize("dtype", SCORE_DTYPES)
@pytest.mark.parametrize("B,T,C,H", [(1, 2, 8, 1), (2, 17, 24, 3), (3, 50, 64, 4), (1, 577, 128, 2)])
@pytest.mark.parametrize("fused", [False, True])
def test_scoring_ops(dtype, B, T, C, H, fused):
    q, k = make_qk(B, T, C, dtype, seed=T + C, fused=fused, spread=2.0)
    atol, rtol = TOL[dtype]
    assert_close(ops.cls_attention(q, k, H), ref_scores(ref.cls_attention, q, k, H), atol=atol, rtol=rtol)
    for has_cls in (True, False):
        got = ops.attention_received(q, k, H, has_cls=has_cls)
        assert got.dtype == torch.float32 and got.shape == (B, T - 1 if has_cls else T)
        assert_close(got, ref_scores(ref.attention_received, q, k, H, has_cls=has_cls), atol=atol, rtol=rtol)
    # fopru_significance picks col or row by a variance comparison: compare against the
    # reference's choice, computed on the same rounded inputs.
    for has_cls in (True, False):
        got = ops.fopru_significance(q, k, H, has_cls=has_cls)
        assert_close(got, ref_scores(ref.fopru_significance, q, k, H, has_cls=has_cls), atol=atol, rtol=rtol)


def test_scoring_scale_and_float64_exactness():
    q, k = make_qk(2, 33, 32, torch.float64, seed=3)
    for scale in (None, 0.05, 1.0):
        assert_close(ops.cls_attention(q, k, 4, scale), ref.cls_attention(q, k, 4, scale), atol=1e-12, rtol=1e-9)
        assert_close(ops.fopru_significance(q, k, 4, scale), ref.fopru_significance(q, k, 4, scale),
                     atol=1e-12, rtol=1e-9)


def test_fopru_significance_picks_rows_when_they_vary_more():
    # One key (column) that every query attends to makes columns vary; queries that differ in
    # sharpness toward the CLS key make rows vary. Both branches must be reachable.
    q, k = make_qk(2, 26, 16, torch.float64, seed=5, spread=0.1)
    q = q.clone()
    k = k.clone()
    k[0, 0] = 3.0   # image 0: CLS key strongly attended by queries with positive channels
    q[0, 1:13] = 2.0
    q[0, 13:] = -2.0
    k[1, 7] = 4.0   # image 1: patch key 7 dominant: column means vary
    q[1, 1:] = 1.0
    a = ref._patch_attention(q, k, 1, None, True)
    col_var, row_var = a.mean(1).var(1, unbiased=False), a.mean(2).var(1, unbiased=False)
    assert bool(row_var[0] > col_var[0]) and bool(col_var[1] >= row_var[1])
    got = ops.fopru_significance(q, k, 1)
    assert_close(got[0], a[0].mean(1).float(), atol=1e-12, rtol=1e-9)
    assert_close(got[1], a[1].mean(0).float(), atol=1e-12, rtol=1e-9)


def score_cases():
    g = torch.Generator().manual_seed(1)
    cases = []
    for N in (1, 2, 7, 49, 576, 2880):
        cases.append(("rand", torch.randn(3, N, generator=g)))
        cases.append(("ties", torch.randint(0, 4, (3, N), generator=g).float()))
    cases.append(("equal", torch.full((2, 49), 0.25)))
    s = torch.randn(4, 49, generator=g)
    s[0, ::3] = float("nan")
    s[1, 5:9] = float("inf")
    s[1, 20:30] = -float("inf")
    s[2, :] = float("nan")
    s[3, ::2] = -0.0
    s[3, 1::2] = 0.0
    cases.append(("nonfinite", s))
    return cases


@pytest.mark.parametrize("dtype", SCORE_DTYPES)
def test_topk_indices(dtype):
    for label, s in score_cases():
        s = s.to(dtype)
        N = s.shape[1]
        for k in sorted({1, 2, N // 2 or 1, N - 1 or 1, N} & set(range(1, N + 1))):
            got = ops.topk_indices(s, k)
            want = ref.topk_indices(s, k)
            assert got.dtype == torch.int64
            assert torch.equal(got, want), (label, N, k)
            assert bool((got.diff(dim=1) > 0).all()) and int(got.min()) >= 0 and int(got.max()) < N


def test_topk_tie_rule_and_nan_rule():
    s = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    assert ops.topk_indices(s, 2).tolist() == [[1, 2]]
    s = torch.tensor([[float("nan"), -float("inf"), 0.0, float("nan")]])
    assert ops.topk_indices(s, 2).tolist() == [[1, 2]]
    assert ops.topk_indices(s, 3).tolist() == [[0, 1, 2]]
    s = torch.tensor([[-0.0, 0.0, -0.0]])
    assert ops.topk_indices(s, 1).tolist() == [[0]]


def test_topk_noncontiguous():
    s = torch.randn(49, 5).t()  # [5, 49] with stride (1, 5)
    assert torch.equal(ops.topk_indices(s, 11), ref.topk_indices(s.contiguous(), 11))


@pytest.mark.parametrize("dtype", SCORE_DTYPES)
def test_gather_tokens(dtype):
    x = torch.randn(3, 50, 7, dtype=torch.float64).to(dtype)
    idx = torch.randint(0, 50, (3, 9))
    assert torch.equal(ops.gather_tokens(x, idx), ref.gather_tokens(x, idx))
    assert torch.equal(ops.gather_tokens(x, idx.int()), ref.gather_tokens(x, idx))
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # stride 1 along tokens, not along D
    assert torch.equal(ops.gather_tokens(xt, idx), ref.gather_tokens(x, idx))


@pytest.mark.parametrize("dtype", SCORE_DTYPES)
@pytest.mark.parametrize("strategy", ["rank", "row"])
def test_fopru_select(dtype, strategy):
    g = torch.Generator().manual_seed(7)
    for N, gw in ((1, 0), (4, 0), (49, 0), (49, 7), (576, 0), (2880, 48), (2880, 0), (30, 5)):
        if strategy == "row" and gw == 0 and math.isqrt(N) ** 2 != N:
            continue
        x = torch.randn(2, N, 5, generator=g, dtype=torch.float64).to(dtype)
        for s in (torch.randn(2, N, generator=g), torch.randint(0, 3, (2, N), generator=g).float()):
            s = s.to(dtype)
            W = gw or math.isqrt(N)
            for keep in sorted({1, 2, W, W + 1, N // 2 or 1, N - 1 or 1, N} & set(range(1, N + 1))):
                tok, idx = ops.fopru_select(x, s, keep, strategy, gw)
                rtok, ridx = ref.fopru_select(x, s, keep, strategy, gw)
                assert torch.equal(idx, ridx), (N, gw, keep)
                assert torch.equal(tok, rtok)


def test_fopru_row_semantics_by_hand():
    # 3 x 3 grid; row sums 6, 15, 24 -> rows 2, 1 best; keep 5 = row 2 whole + best 2 of row 1.
    s = torch.arange(9.0).reshape(1, 9)
    s[0, 3] = 7.0  # row 1 = [7, 4, 5]: best two are positions 3 and 5
    x = torch.arange(9.0).reshape(1, 9, 1)
    tok, idx = ops.fopru_select(x, s, 5, "row")
    assert idx.tolist() == [[3, 5, 6, 7, 8]]
    assert tok[0, :, 0].tolist() == [3.0, 5.0, 6.0, 7.0, 8.0]


def test_fopru_select_nonfinite_never_repeats():
    s = torch.full((2, 36), float("nan"))
    s[1, ::5] = float("inf")
    x = torch.randn(2, 36, 3)
    for strategy in ("rank", "row"):
        for keep in (1, 7, 36):
            _, idx = ops.fopru_select(x, s, keep, strategy)
            assert torch.equal(idx, ref.fopru_select(x, s, keep, strategy)[1])
            assert all(len(set(r)) == keep for r in idx.tolist())


def _r(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


# (op, args, words the message must contain)
BAD = [
    ("cls_attention", (_r(2, 5), _r(2, 5), 1), "q must be"),
    ("cls_attention", (_r(2, 5, 6), _r(2, 4, 6), 1), "same shape"),
    ("cls_attention", (_r(2, 5, 6), _r(2, 5, 6), 4), "num_heads"),
    ("cls_attention", (_r(2, 5, 6), _r(2, 5, 6), 0), "num_heads"),
    ("cls_attention", (_r(2, 1, 6), _r(2, 1, 6), 1), "T=1"),
    ("cls_attention", (_r(2, 5, 6), _r(2, 5, 6), 1, float("inf")), "scale"),
    ("attention_received", (torch.ones(2, 5, 6, dtype=torch.int64), torch.ones(2, 5, 6, dtype=torch.int64), 1), "floating"),
    ("fopru_significance", (_r(2, 5, 6), _r(2, 5, 6, dtype=torch.float64), 1), "dtype"),
    ("topk_indices", (_r(2, 5), 0), "k=0"),
    ("topk_indices", (_r(2, 5), 6), "k=6"),
    ("topk_indices", (_r(2, 5, 1), 1), "scores must be"),
    ("topk_indices", (torch.arange(10).reshape(2, 5), 1), "floating"),
    ("gather_tokens", (_r(2, 5, 3), torch.tensor([[0], [5]])), "indices must lie"),
    ("gather_tokens", (_r(2, 5, 3), torch.tensor([[-1], [0]])), "indices must lie"),
    ("gather_tokens", (_r(2, 5, 3), torch.tensor([[0.0], [1.0]])), "indices must be"),
    ("gather_tokens", (_r(2, 5, 3), torch.tensor([[0]])), "batch"),
    ("gather_tokens", (torch.ones(2, 5, 3, dtype=torch.int32), torch.tensor([[0], [1]])), "floating"),
    ("fopru_select", (_r(2, 9, 3), _r(2, 9), 10), "keep"),
    ("fopru_select", (_r(2, 9, 3), _r(2, 9), 0), "keep"),
    ("fopru_select", (_r(2, 9, 3), _r(2, 8), 2), "tokens"),
    ("fopru_select", (_r(3, 9, 3), _r(2, 9), 2), "batch"),
    ("fopru_select", (_r(2, 9, 3), _r(2, 9), 2, "diag"), "strategy"),
    ("fopru_select", (_r(2, 10, 3), _r(2, 10), 2, "row"), "grid_width"),
    ("fopru_select", (_r(2, 10, 3), _r(2, 10), 2, "row", 3), "grid_width"),
    ("fopru_select", (_r(2, 10, 3), _r(2, 10), 2, "rank", -1), "grid_width"),
]


@pytest.mark.parametrize("backend", ["compiled", "reference"])
@pytest.mark.parametrize("case", BAD, ids=lambda c: f"{c[0]}-{c[2]}")
def test_bad_input(case, backend):
    name, args, words = case
    fn = getattr(ops if backend == "compiled" else ref, name)
    with pytest.raises(ValueError) as e:
        fn(*args)
    assert words in str(e.value), str(e.value)


def opcheck_samples():
    q, k = make_qk(2, 17, 24, torch.float32, seed=2, fused=True)
    s = torch.randn(2, 36)
    x = torch.randn(2, 36, 5)
    return [
        ("cls_attention", (q, k, 3), {}),
        ("cls_attention", (q.double(), k.double(), 3, 0.1), {}),
        ("attention_received", (q, k, 3), {"has_cls": False}),
        ("fopru_significance", (q.half(), k.half(), 3), {}),
        ("topk_indices", (s, 5), {}),
        ("gather_tokens", (x, torch.randint(0, 36, (2, 4))), {}),
        ("fopru_select", (x, s, 8), {}),
        ("fopru_select", (x, s, 8, "row", 6), {}),
    ]


@pytest.mark.parametrize("case", opcheck_samples(), ids=lambda c: c[0])
def test_opcheck(case):
    name, args, kwargs = case
    torch.library.opcheck(getattr(torch.ops.vtk, name).default, args, kwargs)


def test_torch_compile_fullgraph():
    def prune(q, k, x):
        s = ops.fopru_significance(q, k, 4)
        tok, idx = ops.fopru_select(x, s, 7, "row")
        top = ops.topk_indices(ops.cls_attention(q, k, 4), 5)
        return tok * 2, idx, ops.gather_tokens(x, top)

    q, k = make_qk(2, 37, 32, torch.float32, seed=9)
    x = torch.randn(2, 36, 8)
    compiled = torch.compile(prune, fullgraph=True, backend="inductor")
    for got, want in zip(compiled(q, k, x), prune(q, k, x)):
        assert torch.equal(got, want)


def test_cpu_kernels_under_inference_mode_on_several_threads():
    # The HF adapters and `vtk demo` call the ops under torch.inference_mode(); the CPU kernels'
    # worker threads run ATen ops on tensors made under it, so they must carry the mode along.
    g = torch.Generator().manual_seed(11)
    q, k = torch.randn(2, 65, 64, generator=g), torch.randn(2, 65, 64, generator=g)
    x, s = torch.randn(2, 64, 32, generator=g), torch.rand(2, 64, generator=g)
    calls = {
        "cls_attention": lambda: ops.cls_attention(q, k, 4),
        "attention_received": lambda: ops.attention_received(q, k, 4),
        "fopru_significance": lambda: ops.fopru_significance(q, k, 4),
        "fopru_select": lambda: ops.fopru_select(x, s, 16, "row"),
        "vispruner_select": lambda: ops.vispruner_select(x, s, 12),
        "prumerge": lambda: ops.prumerge(x, x, s),
    }
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, before))
        for name, call in calls.items():
            want = call()
            with torch.inference_mode():
                got = call()
            for a, b in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
                assert torch.equal(a, b), name
    finally:
        torch.set_num_threads(before)
