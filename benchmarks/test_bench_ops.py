"""Scoring, selection and gather ops: vtk kernels against the published way of computing them.

Published path ("published"): attention maps as `output_attentions` returns them ([B, H, T, T],
softmax in float32 cast back to the input dtype, as Hugging Face's eager attention does), then
reductions; selection as topk + sort + gather. The vtk path never forms an attention map.

Real sizes (--benchmark): LLaVA-1.5 (T = 577, C = 1024, 16 heads, N = 576) and LLaVA-NeXT (5 crops
per image: scoring on 5B crops, selection over N = 2880 per image); B = 1, 8, 64 on CUDA and
B = 1, 4 on the CPU. Smoke mode: tiny shapes, one run, result checked.
"""
import pytest
import torch

from vtkernels import ops
from vtkernels import reference as ref

from bench_util import sync


def published_attention(q, k, num_heads):
    B, T, C = q.shape
    dh = C // num_heads
    qh = q.reshape(B, T, num_heads, dh).transpose(1, 2)
    kh = k.reshape(B, T, num_heads, dh).transpose(1, 2)
    w = torch.matmul(qh, kh.transpose(-1, -2)) * dh ** -0.5
    return torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)


def published_cls_attention(q, k, num_heads):
    return published_attention(q, k, num_heads)[:, :, 0, 1:].float().mean(1)


def published_fopru_significance(q, k, num_heads):
    a = published_attention(q, k, num_heads).float().mean(1)[:, 1:, 1:]
    col, row = a.mean(1), a.mean(2)
    use_col = col.var(1, unbiased=False) >= row.var(1, unbiased=False)
    return torch.where(use_col[:, None], col, row)


def published_topk(scores, k):
    return scores.topk(k, dim=1).indices.sort(dim=1).values


def published_gather(x, idx):
    return torch.gather(x, 1, idx[:, :, None].expand(-1, -1, x.shape[2]))


def published_fopru_select(x, scores, keep):
    idx = published_topk(scores, keep)
    return published_gather(x, idx), idx


def scoring_shape(real):
    return (577, 1024, 16) if real else (17, 32, 2)


def dtype_for(device):
    return torch.float16 if device.type == "cuda" else torch.float32


def published_attention_received(q, k, num_heads):
    return published_attention(q, k, num_heads).float().mean(1)[:, 1:, 1:].mean(1)


SCORING = {
    "cls_attention": (ops.cls_attention, published_cls_attention, ref.cls_attention),
    "fopru_significance": (ops.fopru_significance, published_fopru_significance, ref.fopru_significance),
    "attention_received": (ops.attention_received, published_attention_received, ref.attention_received),
}


@pytest.mark.parametrize("model", ["llava15", "llavanext"])
@pytest.mark.parametrize("impl", ["vtk", "published"])
@pytest.mark.parametrize("op", list(SCORING))
def test_scoring(benchmark, record, device, real_sizes, op, impl, model, batch):
    vtk_fn, pub_fn, ref_fn = SCORING[op]
    B = batch * (5 if model == "llavanext" else 1)
    T, C, H = scoring_shape(real_sizes)
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(B, T, C, generator=g).to(device, dtype_for(device))
    k = torch.randn(B, T, C, generator=g).to(device, dtype_for(device))
    fn = (lambda: vtk_fn(q, k, H)) if impl == "vtk" else (lambda: pub_fn(q, k, H))
    out = fn()
    if not real_sizes:  # smoke mode: the result must be right
        torch.testing.assert_close(out.float().cpu(), ref_fn(q.cpu(), k.cpu(), H), atol=2e-3, rtol=2e-2)

    def run():
        fn()
        sync(device)

    # The least any implementation must move: cls_attention reads k and the CLS query, the others
    # q and k, and each writes its [B, N] float32 scores. The DRAM floor is this / copy bandwidth.
    es = q.element_size()
    read = B * (T + 1) * C * es if op == "cls_attention" else 2 * B * T * C * es
    record(run, device, op=op, impl=impl, model=model, B=B, T=T, C=C, heads=H, dtype=str(q.dtype),
           bytes_moved=read + B * (T - 1) * 4)
    benchmark(run)


def test_copy_bandwidth(benchmark, record, device, real_sizes):
    """Device-to-device copy of one large buffer (torch's copy kernel): the bandwidth that sets the
    DRAM floor of the memory-bound ops (their bytes moved / this bandwidth). 512 MiB at real sizes
    on CUDA (far past any cache), 64 MiB on the CPU, 1 MiB in smoke mode."""
    n = ((512 if device.type == "cuda" else 64) << 20) if real_sizes else (1 << 20)
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)

    def run():
        dst.copy_(src)
        sync(device)

    run()
    if not real_sizes:
        assert torch.equal(dst, src)
    record(run, device, op="copy", impl="copy", B=1, bytes_moved=2 * n)
    benchmark(run)


SELECT = [("topk_indices", "vtk"), ("topk_indices", "published"), ("gather_tokens", "vtk"),
          ("gather_tokens", "published"), ("fopru_select", "vtk"), ("fopru_select", "published"),
          ("fopru_select_row", "vtk")]  # the row strategy has no topk equivalent


@pytest.mark.parametrize("model", ["llava15", "llavanext"])
@pytest.mark.parametrize("op,impl", SELECT)
def test_selection(benchmark, record, device, real_sizes, op, impl, model, batch):
    B = batch
    N = (2880 if model == "llavanext" else 576) if real_sizes else (45 if model == "llavanext" else 36)
    D = 4096 if real_sizes else 16  # LLaVA-1.5-7B features after the projector
    keep = N // 4
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(B, N, D, generator=g).to(device, dtype_for(device))
    s = torch.rand(B, N, generator=g).to(device)
    idx = ref.topk_indices(s.cpu(), keep).to(device)
    grid = 48 if model == "llavanext" and real_sizes else (9 if model == "llavanext" else 0)
    fns = {
        ("topk_indices", "vtk"): lambda: ops.topk_indices(s, keep),
        ("topk_indices", "published"): lambda: published_topk(s, keep),
        ("gather_tokens", "vtk"): lambda: ops.gather_tokens(x, idx),
        ("gather_tokens", "published"): lambda: published_gather(x, idx),
        ("fopru_select", "vtk"): lambda: ops.fopru_select(x, s, keep),
        ("fopru_select", "published"): lambda: published_fopru_select(x, s, keep),
        ("fopru_select_row", "vtk"): lambda: ops.fopru_select(x, s, keep, "row", grid),
    }
    fn = fns[(op, impl)]
    out = fn()
    if not real_sizes:
        want = {"topk_indices": lambda: ref.topk_indices(s.cpu(), keep),
                "gather_tokens": lambda: ref.gather_tokens(x.cpu(), idx.cpu()),
                "fopru_select": lambda: ref.fopru_select(x.cpu(), s.cpu(), keep)[0],
                "fopru_select_row": lambda: ref.fopru_select(x.cpu(), s.cpu(), keep, "row", grid)[0]}[op]()
        got = out[0] if isinstance(out, tuple) else out
        assert torch.equal(got.cpu(), want)

    def run():
        fn()
        sync(device)

    bytes_moved = {"topk_indices": s.numel() * 4 + B * keep * 8,
                   "gather_tokens": 2 * B * keep * D * x.element_size() + B * keep * 8,
                   }.get(op, s.numel() * 4 + B * keep * 8 + 2 * B * keep * D * x.element_size())
    record(run, device, op=op, impl=impl, model=model, B=B, N=N, D=D, keep=keep, bytes_moved=bytes_moved)
    benchmark(run)
