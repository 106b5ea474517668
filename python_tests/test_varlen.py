"""attention_received_varlen on every backend against vtkernels.reference.

Backends: "cpp" (the dispatcher on CPU tensors: the C++ kernel of csrc/cpu/varlen_cpu.cpp),
"triton" (vtkernels/triton/varlen.py called directly: under TRITON_INTERPRET=1 on CPU tensors
when there is no GPU, on CUDA tensors otherwise) and, for the argument checks, "reference".
The CUDA dispatcher path (Triton) and CUDA graph capture are tested at the end (gpu marker).

The oracle is the reference run in float64 on the same (already rounded) inputs, so only the
kernel's own error is measured: float64 inputs must agree to the float32 rounding of the output
(both sides round a float64 result once), float32 and 16-bit inputs (exact products, float32
accumulation) to float32 accumulation error. Segment lengths are odd on purpose: 1, 7, 49, 130,
empty segments at the start, middle and end; one segment of 16K tokens (C++ only) is compared
with a float64 reference computed here in row chunks (the reference would form a 16K x 16K map).
"""
import os

import pytest
import torch
from torch.testing import assert_close

import vtkernels
from vtkernels import ops
from vtkernels import reference as ref

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")
TRITON_DEVICE = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else None)

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# (rtol, atol) of float32 scores against the float64 reference on the same inputs. float64: one
# float32 rounding apart at most (2^-23 relative); float32: accumulation error of sums over a
# few hundred terms; 16-bit inputs are widened exactly, then computed as float32.
TOL = {
    torch.float64: (2.4e-7, 1e-12),
    torch.float32: (1e-5, 1e-7),
    torch.float16: (1e-5, 1e-7),
    torch.bfloat16: (1e-5, 1e-7),
}

# (segment lengths, C, heads): head dims 16, 8 (< 16: tl.dot pads), 80 (Qwen's; chunked in
# float32/64 by Triton), 160 (chunked in every dtype), 1280 (one head of the Qwen tower's width).
CASES = [
    ([1], 32, 2),
    ([1, 7, 49, 130], 32, 2),
    ([0, 5, 0, 33, 1, 0], 24, 3),
    ([19, 64, 65], 320, 2),
    ([3, 70], 160, 2),
    ([37], 1280, 1),
]


def _cu(lens, dtype=torch.int32):
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=dtype)


def make_packed(lens, C, dtype, layout="fused", seed=0, spread=2.0, cu_dtype=torch.int32):
    """q, k [S, C] of dtype in the given memory layout, and cu_seqlens."""
    S = sum(lens)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * spread).to(dtype)

    if layout == "fused":  # views of a fused qkv projection: row stride 3C
        qkv = rnd(S, 3 * C)
        q, k = qkv[:, :C], qkv[:, C:2 * C]
    elif layout == "rows":  # every other row of a larger tensor: row stride 2C
        q, k = rnd(2 * S, C)[::2], rnd(2 * S, C)[::2]
    elif layout == "transposed":  # channel stride S: no unit stride along C
        q, k = rnd(C, S).t(), rnd(C, S).t()
    else:
        q, k = rnd(S, C), rnd(S, C)
    return q, k, _cu(lens, cu_dtype)


def run(backend, q, k, cu, H, scale=None):
    if backend == "cpp":
        return ops.attention_received_varlen(q, k, cu, H, scale)
    if backend == "triton":
        if TRITON_DEVICE is None:
            pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
        from vtkernels.triton import varlen as TV
        d = TRITON_DEVICE
        return TV.attention_received_varlen(q.to(d), k.to(d), cu.to(d), H, scale).cpu()
    return ref.attention_received_varlen(q, k, cu, H, scale)


def oracle(q, k, cu, H, scale=None):
    return ref.attention_received_varlen(q.double(), k.double(), cu, H, scale)


def check(got, want, dtype, S):
    rtol, atol = TOL[dtype]
    assert got.dtype == torch.float32 and got.shape == (S,)
    assert_close(got, want, rtol=rtol, atol=atol)


# --- backends and registration -------------------------------------------------------------

def test_served_by_compiled_cpu_kernel_and_triton_on_cuda():
    assert vtkernels.extension_error is None, vtkernels.extension_error
    assert vtkernels.backend_of("attention_received_varlen", "CPU") == "compiled"
    tri, _ = ops._CUDA["attention_received_varlen"]
    assert tri is not None and tri.__name__ == "triton_attention_received_varlen"


# --- against the reference ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'-'.join(map(str, c[0]))}_C{c[1]}_H{c[2]}")
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_matches_reference(backend, case, dtype):
    lens, C, H = case
    q, k, cu = make_packed(lens, C, dtype, seed=len(lens) + C)
    got = run(backend, q, k, cu, H)
    check(got, oracle(q, k, cu, H), dtype, sum(lens))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("layout", ["fused", "rows", "transposed", "contiguous"])
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64], ids=str)
def test_layouts_and_cu_dtypes(backend, layout, cu_dtype):
    lens, C, H = [0, 7, 49, 0, 13], 48, 3
    for dtype in (torch.float32, torch.float16):
        q, k, cu = make_packed(lens, C, dtype, layout=layout, seed=5, cu_dtype=cu_dtype)
        assert q.is_contiguous() == (layout == "contiguous")
        check(run(backend, q, k, cu, H), oracle(q, k, cu, H), dtype, sum(lens))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_scale(backend):
    q, k, cu = make_packed([3, 50, 1], 32, torch.float64, seed=2)
    for scale in (0.05, 1.0, -0.3):  # a negative scale flips which key is each row's max
        check(run(backend, q, k, cu, 4, scale), oracle(q, k, cu, 4, scale), torch.float64, 54)
    # scale=None is head_dim ** -0.5
    assert torch.equal(run(backend, q, k, cu, 4), run(backend, q, k, cu, 4, 8 ** -0.5))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_each_segment_sums_to_one(backend, dtype):
    lens = [1, 0, 7, 49, 130, 2]
    q, k, cu = make_packed(lens, 32, dtype, seed=9, spread=3.0)
    got = run(backend, q, k, cu, 2).double()
    c = cu.tolist()
    for s0, s1 in zip(c, c[1:]):
        if s1 > s0:
            assert abs(float(got[s0:s1].sum()) - 1.0) < 1e-5, (s0, s1)
    assert float(got[0]) == 1.0  # a segment of one token receives all of its own attention
    assert bool((got >= 0).all())


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_segments_are_independent(backend):
    """Each segment scores as if it were alone: attention never crosses a segment boundary."""
    lens = [7, 49, 130]
    q, k, cu = make_packed(lens, 32, torch.float64, seed=4)
    got = run(backend, q, k, cu, 2)
    c = cu.tolist()
    for s0, s1 in zip(c, c[1:]):
        alone = run(backend, q[s0:s1], k[s0:s1], _cu([s1 - s0]), 2)
        check(got[s0:s1], alone, torch.float64, s1 - s0)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_empty(backend):
    for C in (8, 16):
        q = torch.randn(0, C)
        for cu in (torch.tensor([0]), torch.tensor([0, 0, 0])):
            got = run(backend, q, q, cu, 2)
            assert got.shape == (0,) and got.dtype == torch.float32


def _chunked_float64(q, k, cu, H, rows=1024):
    """The op in float64 without the map: per segment and head, row chunks of the softmax."""
    q, k = q.double(), k.double()
    S, C = q.shape
    dh = C // H
    out = torch.zeros(S, dtype=torch.float64)
    c = cu.tolist()
    for s0, s1 in zip(c, c[1:]):
        for h in range(H):
            kh = k[s0:s1, h * dh:(h + 1) * dh]
            for r in range(s0, s1, rows):
                p = torch.softmax(q[r:min(r + rows, s1), h * dh:(h + 1) * dh] @ kh.t() * dh ** -0.5, dim=1)
                out[s0:s1] += p.sum(0)
        out[s0:s1] /= H * (s1 - s0)
    return out.float()


@pytest.fixture(scope="module")
def long_case():
    """16K tokens in one segment next to a short one; float32 values (exact in float64 too), so
    one float64 oracle serves both dtypes."""
    lens = [16391, 5]
    q, k, cu = make_packed(lens, 8, torch.float32, layout="fused", seed=16, spread=1.5)
    return q, k, cu, _chunked_float64(q, k, cu, 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_long_segment_cpp(long_case, dtype):
    """The C++ kernel's two-pass path: rows of 16391 logits no longer fit its tile."""
    q, k, cu, want = long_case
    got = ops.attention_received_varlen(q.to(dtype), k.to(dtype), cu, 1)
    check(got, want, dtype, q.shape[0])
    assert abs(float(got[:16391].double().sum()) - 1.0) < 1e-4


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_inference_mode_and_grad_inputs(backend):
    """Under torch.inference_mode() (how models run) and on inputs that require grad; the C++
    kernel's worker threads must see the caller's mode, or their in-place adds fail."""
    q, k, cu = make_packed([130, 300, 7], 64, torch.float32, seed=10)
    want = oracle(q, k, cu, 4)
    with torch.inference_mode():
        qi, ki = q.clone(), k.clone()
        check(run(backend, qi, ki, cu, 4), want, torch.float32, 437)
    qg = q.clone().requires_grad_()
    check(run(backend, qg, k, cu, 4).detach(), want, torch.float32, 437)


def test_cpp_independent_of_thread_count_and_deterministic():
    lens = [1, 300, 0, 1000, 77]
    q, k, cu = make_packed(lens, 64, torch.float32, seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.attention_received_varlen(q, k, cu, 4)
        torch.set_num_threads(max(2, before))
        many = ops.attention_received_varlen(q, k, cu, 4)
        again = ops.attention_received_varlen(q, k, cu, 4)
    finally:
        torch.set_num_threads(before)
    # Every task (segment, head, chunk of rows) is computed by one thread into its own slot and
    # the slots are reduced in a fixed order: the same bits for any number of threads.
    assert torch.equal(one, many) and torch.equal(many, again)


def test_cpp_under_inference_mode_on_several_threads():
    # The HF adapters score under torch.inference_mode(): the worker threads must be allowed to
    # update the (inference) tensors the kernel allocates.
    lens = [1, 300, 0, 1000, 77]
    q, k, cu = make_packed(lens, 64, torch.float32, seed=5)
    want = ops.attention_received_varlen(q, k, cu, 4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, before))
        with torch.inference_mode():
            got = ops.attention_received_varlen(q, k, cu, 4)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, want)


def test_triton_deterministic():
    q, k, cu = make_packed([7, 130], 32, torch.float32, seed=8)
    assert torch.equal(run("triton", q, k, cu, 2), run("triton", q, k, cu, 2))


def test_triton_launch_config_is_pure_and_bounded():
    from vtkernels.triton.varlen import _launch_config
    for S, C, H in [(1, 8, 1), (5476, 1280, 16), (64, 1280, 1), (100, 1024, 16), (7, 1152, 16), (9, 2048, 16)]:
        for dtype in DTYPES:
            cfg = _launch_config(S, C, H, dtype)
            assert cfg == _launch_config(S, C, H, dtype)
            dh = C // H
            assert cfg["BLOCK_D"] >= 16 and cfg["BLOCK_D"] <= 128
            assert cfg["BLOCK_D"] <= 64  # heads looped in chunks of at most 64 channels
            # shared memory of the dot operands and register tiles, the bounds the docstring promises
            item = torch.empty(0, dtype=dtype).element_size()
            bm, bn, bd, st = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"], cfg["num_stages"]
            elems = st * (bm + bn) * bd
            assert elems * item <= 48 * 1024, (S, C, H, dtype, cfg)
            if item >= 4:  # FMA dots: operands in registers, at most 16 KiB per operand tile
                assert max(bm, bn) * bd * item <= 16 * 1024, (S, C, H, dtype, cfg)


# --- bad input -------------------------------------------------------------------------------

def _bad_cases():
    q, k = torch.randn(10, 8), torch.randn(10, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    return [
        ((q[0], k, cu, 2), "q must be [S, C]"),
        ((q[None], k[None], cu, 2), "q must be [S, C]"),
        ((q, k[0], cu, 2), "k must be [S, C]"),
        ((q, k[:9], cu, 2), "same shape"),
        ((q, k.double(), cu, 2), "same dtype"),
        ((q.to(torch.int64), k.to(torch.int64), cu, 2), "floating"),
        ((q, k, cu, 3), "num_heads"),
        ((q, k, cu, 0), "num_heads"),
        ((q, k, cu, 2, float("inf")), "scale"),
        ((q, k, cu.float(), 2), "int32 or int64"),
        ((q, k, cu[None], 2), "cu_seqlens must be [n + 1]"),
        ((q, k, cu[:0], 2), "cu_seqlens must be [n + 1]"),
        ((q, k, torch.tensor([1, 4, 10]), 2), "start at 0"),
        ((q, k, torch.tensor([0, 6, 4, 10]), 2), "non-decreasing"),
        ((q, k, torch.tensor([0, 4, 9]), 2), "end at S=10"),
        ((q, k, torch.tensor([0, 4, 11]), 2), "end at S=10"),
        ((q, k, torch.tensor([0, 11, 10]), 2), "non-decreasing"),
    ]


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[1])
def test_bad_input(backend, case):
    args, words = case
    with pytest.raises(ValueError) as e:
        run(backend, *args)
    assert words in str(e.value), str(e.value)
    if "cu_seqlens must start" in words or "end at" in words or "non-decreasing" in words:
        assert "cu_seqlens" in str(e.value)


def test_bad_cu_seqlens_message_matches_python():
    q = torch.randn(10, 8)
    for cu in (torch.tensor([0, 6, 4, 10]), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 11])):
        msgs = []
        for backend in ("cpp", "reference"):
            with pytest.raises(ValueError) as e:
                run(backend, q, q, cu, 2)
            msgs.append(str(e.value).splitlines()[0])
        assert msgs[0] == msgs[1], msgs


# --- torch.library / torch.compile ------------------------------------------------------------

def _opcheck_samples():
    q, k, cu = make_packed([1, 7, 0, 49], 24, torch.float32, seed=1)
    q64, k64, cu64 = make_packed([13, 2], 16, torch.float64, layout="rows", seed=2, cu_dtype=torch.int64)
    qh, kh, cuh = make_packed([20], 32, torch.float16, seed=3)
    return [(q, k, cu, 3), (q64, k64, cu64, 2, 0.2), (qh, kh, cuh, 4)]


@pytest.mark.parametrize("args", _opcheck_samples(), ids=["fused-f32", "rows-f64-scale", "f16"])
def test_opcheck(args):
    torch.library.opcheck(torch.ops.vtk.attention_received_varlen.default, args)


def test_torch_compile_fullgraph():
    def score_and_pick(q, k, cu):
        s = ops.attention_received_varlen(q, k, cu, 4)
        return s * 2, s.topk(5).indices

    q, k, cu = make_packed([7, 49, 30], 64, torch.float32, seed=6)
    compiled = torch.compile(score_and_pick, fullgraph=True, backend="inductor")
    for got, want in zip(compiled(q, k, cu), score_and_pick(q, k, cu)):
        assert torch.equal(got, want)


# --- CUDA (gpu marker; needs a device) --------------------------------------------------------

# Qwen2.5-VL-7B tower shapes: one 1024 x 1024 px image, and images of several sizes packed.
CUDA_TOWER_CASES = [([5476], 1280, 16), ([1024, 4096, 1, 0, 333, 2000], 1280, 16)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_dispatch_matches_reference(dtype):
    assert vtkernels.backend_of("attention_received_varlen", "CUDA") == "triton"
    # The tower shapes in float16 (what the benchmark runs) and float32; the oracle on the host
    # forms each image's float64 map, so they are not repeated for every dtype.
    cases = CASES + (CUDA_TOWER_CASES if dtype in (torch.float16, torch.float32) else [])
    for lens, C, H in cases:
        q, k, cu = make_packed(lens, C, dtype, seed=C)
        got = ops.attention_received_varlen(q.cuda(), k.cuda(), cu.cuda(), H)
        assert got.is_cuda
        rtol, atol = TOL[dtype]
        assert_close(got.cpu(), oracle(q, k, cu, H), rtol=rtol, atol=atol)
    q = torch.randn(10, 8, device="cuda", dtype=dtype)
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.attention_received_varlen(q, q, torch.tensor([0, 9, 1, 10], device="cuda"), 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_capture_and_replay():
    lens, C, H = [1, 7, 49, 130, 0, 333], 128, 4
    q, k, cu = make_packed(lens, C, torch.float16, seed=12)
    q_d, k_d, cu_d = q.cuda().contiguous(), k.cuda().contiguous(), cu.cuda()
    ops.attention_received_varlen(q_d, k_d, cu_d, H)  # compiles the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.attention_received_varlen(q_d, k_d, cu_d, H)
    q2, k2, _ = make_packed(lens, C, torch.float16, seed=13)
    q_d.copy_(q2.cuda())
    k_d.copy_(k2.cuda())
    graph.replay()
    torch.cuda.synchronize()
    rtol, atol = TOL[torch.float16]
    assert_close(out.cpu(), oracle(q2, k2, cu, H), rtol=rtol, atol=atol)
