"""attention_received_varlen: the vtk kernel against the eager per-image attention path.

Eager path ("eager"): what a Qwen-VL tower gives without the fused op, image by image: the
attention map of each image ([H, n, n], softmax in float32 cast back to the input dtype, as
Hugging Face's eager attention does), then the mean over heads and over the image's queries.
The vtk path never forms a map and never pads images to the longest.

Real sizes (--benchmark), the Qwen2.5-VL-7B vision tower (width 1280, 16 heads of 80), q and k as
views of the fused qkv projection: one image of 1024 x 1024 px (74 x 74 = 5476 patches), one of
4096 patches (64 x 64), and 8 images of different sizes packed along one sequence. float16 on
CUDA, float32 on the CPU. Smoke mode: the same cases at toy sizes, one run, result checked
against the reference.
"""
import pytest
import torch

from vtkernels import ops
from vtkernels import reference as ref

from bench_util import sync

WIDTH, HEADS = 1280, 16  # Qwen2.5-VL-7B vision tower
# Patch grids (h/14 x w/14) of images whose sides are multiples of 28 px, as the processor resizes them.
PACKED_8 = [74 * 74, 36 * 64, 48 * 48, 20 * 30, 32 * 46, 16 * 16, 58 * 40, 24 * 24]
SHAPES = {
    "1img-5476": [5476],
    "1img-4096": [4096],
    "8img-packed": PACKED_8,
}
# Smoke mode: the same cases at toy sizes (width 64, 4 heads); the packed one has an empty image.
SMOKE = {"1img-5476": [74], "1img-4096": [64], "8img-packed": [1, 7, 49, 0, 130, 16, 9, 25]}


def eager_attention_received(q, k, cu_seqlens, num_heads):
    """Per image: the attention map, then its mean over heads and queries."""
    S, C = q.shape
    dh = C // num_heads
    out = torch.empty(S, dtype=torch.float32, device=q.device)
    cu = cu_seqlens.tolist()
    for s0, s1 in zip(cu, cu[1:]):
        if s1 == s0:
            continue
        n = s1 - s0
        qh = q[s0:s1].reshape(n, num_heads, dh).transpose(0, 1)
        kh = k[s0:s1].reshape(n, num_heads, dh).transpose(0, 1)
        w = torch.matmul(qh, kh.transpose(-1, -2)) * dh ** -0.5
        p = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        out[s0:s1] = p.float().mean(0).mean(0)
    return out


def dtype_for(device):
    return torch.float16 if device.type == "cuda" else torch.float32


@pytest.mark.parametrize("impl", ["vtk", "eager"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_attention_received_varlen(benchmark, record, device, real_sizes, shape, impl):
    lens, C, H = (SHAPES[shape], WIDTH, HEADS) if real_sizes else (SMOKE[shape], 64, 4)
    S = sum(lens)
    g = torch.Generator(device="cpu").manual_seed(0)
    qkv = torch.randn(S, 3 * C, generator=g).to(device, dtype_for(device))
    q, k = qkv[:, :C], qkv[:, C:2 * C]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    if impl == "vtk":
        fn = lambda: ops.attention_received_varlen(q, k, cu, H)  # noqa: E731
    else:
        fn = lambda: eager_attention_received(q, k, cu, H)  # noqa: E731
    out = fn()
    if not real_sizes:  # smoke mode: the result must be right
        want = ref.attention_received_varlen(q.cpu().double(), k.cpu().double(), cu.cpu(), H)
        torch.testing.assert_close(out.cpu(), want, atol=1e-6, rtol=1e-3)

    def run():
        fn()
        sync(device)

    record(run, device, op="attention_received_varlen", impl=impl, model="qwen2.5-vl-7b", shape=shape,
           S=S, images=len(lens), C=C, heads=H, dtype=str(q.dtype))
    benchmark(run)
