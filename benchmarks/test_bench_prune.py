"""vispruner_select and prumerge: vtk kernels against the published structure.

Published structure ("published"): the papers' code paths as they run. VisPruner: a Python loop
of duplicate-removal rounds (about 64 at keep = 64), each gathering the residual tokens,
multiplying the two halves and sorting (batched over images). PruMerge: the outlier count on the
host (numpy), then a Python loop over images and kept tokens, one similarity product, top-32 and
weighted sum per kept token; PruMerge+ adds its spatial samples with a Python membership loop.
The vtk path forms the similarities once per image and runs the rest in one kernel per image
(VisPruner) or per block of output rows (PruMerge).

Real sizes (--benchmark): LLaVA-1.5 (N = 576 patches, C = 1024 vision features, keys of width
1024) and LLaVA-NeXT (5 crops of 576 per image, each pruned independently: batch 5B); keep = 64
for VisPruner; scores shaped like CLS attention (about 30 IQR outliers of 576). B = 1, 8, 64 on
CUDA and B = 1, 4 on the CPU. Smoke mode: tiny shapes, one run, result checked against the
reference.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vtkernels import ops
from vtkernels import reference as ref

from bench_util import sync


# --- the published structure ---------------------------------------------------------------------

def published_vispruner(x, scores, keep, important_ratio=0.5):
    """VisPruner's published selection loop (index form), batched over images."""
    B = x.shape[0]
    n_imp = int(keep * important_ratio)
    n_div = keep - n_imp
    order = scores.argsort(dim=-1, descending=True)
    important, residual = order[:, :n_imp], order[:, n_imp:]
    xn = x / x.norm(dim=-1, keepdim=True)
    rows = torch.arange(B, device=x.device)[:, None]
    while True:
        R = residual.shape[1]
        r = min(8, R - n_div)
        if r <= 0:
            break
        tokens = xn[rows.expand(-1, R), residual]
        match = (tokens[:, ::2] @ tokens[:, 1::2].transpose(-1, -2)).max(dim=-1).values
        distinct = match.argsort(dim=-1, descending=True)[:, r:]
        residual = torch.cat([residual[:, ::2][rows.expand(-1, R // 2 - r), distinct], residual[:, 1::2]], dim=-1)
    return torch.cat([important, residual], dim=-1).sort(dim=-1).values


def _complement(idx, N):
    a = torch.arange(N, device=idx.device).expand(idx.shape[0], -1)
    return torch.scatter(a, 1, idx, 0).sort(dim=1).values[:, idx.shape[1]:]


def published_prumerge(x, keys, scores, plus=False):
    """PruMerge / PruMerge+ as published: pooled IQR count on the host, Python loops over images
    and kept tokens."""
    B, N, C = x.shape
    v = scores.float().cpu().numpy().ravel()
    q1, q3 = np.percentile(v, 25), np.percentile(v, 75)
    ratio = len(np.where(v > q3 + 1.5 * (q3 - q1))[0]) / len(v)
    idx = torch.topk(scores, max(1, int(N * ratio)), dim=1).indices
    if plus:
        step = max(1, (N // idx.shape[1]) // 3)
        seq = torch.arange(0, N - 1, step, device=x.device)
        flat = idx.flatten()
        extra = torch.tensor([int(p) for p in seq if p not in flat], dtype=torch.long, device=x.device)
        idx = torch.cat([idx, extra[None].expand(B, -1)], dim=1)
    gather = lambda t, i: torch.gather(t, 1, i[..., None].expand(-1, -1, t.shape[2]))  # noqa: E731
    x_kept, s_kept, k_kept = gather(x, idx), torch.gather(scores, 1, idx), F.normalize(gather(keys, idx), dim=-1)
    compl = _complement(idx, N)
    x_rest, s_rest, k_rest = gather(x, compl), torch.gather(scores, 1, compl), F.normalize(gather(keys, compl), dim=-1)
    out = torch.zeros_like(x_kept)
    for b in range(B):
        for i in range(idx.shape[1]):
            rest_x = torch.cat([x_kept[b, :i], x_kept[b, i + 1:], x_rest[b]])
            rest_s = torch.cat([s_kept[b, :i], s_kept[b, i + 1:], s_rest[b]])
            rest_k = torch.cat([k_kept[b, :i], k_kept[b, i + 1:], k_rest[b]])
            near = torch.topk(rest_k @ k_kept[b, i], k=min(32, rest_k.shape[0])).indices
            out[b, i] = x_kept[b, i] + (rest_x[near] * rest_s[near, None]).sum(dim=0)
    summary = (x_rest * s_rest[..., None]).sum(dim=1, keepdim=True)
    return torch.cat([out, summary], dim=1)


# --- inputs --------------------------------------------------------------------------------------

def inputs(model, batch, real, device):
    B = batch * (5 if model == "llavanext" else 1)
    N, C = (576, 1024) if real else (64, 32)
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    x = torch.randn(B, N, C, generator=g).to(device, dtype)
    keys = torch.randn(B, N, C, generator=g).to(device, dtype)
    scores = torch.softmax(torch.randn(B, N, generator=g) * 0.7, dim=-1).to(device)
    return x, keys, scores


def _run(fn, device):
    def run():
        fn()
        sync(device)
    return run


@pytest.mark.parametrize("model", ["llava15", "llavanext"])
@pytest.mark.parametrize("impl", ["vtk", "published"])
def test_vispruner(benchmark, record, device, real_sizes, impl, model, batch):
    x, _, s = inputs(model, batch, real_sizes, device)
    keep = 64 if real_sizes else 16
    select = ops.vispruner_select if impl == "vtk" else published_vispruner
    fn = lambda: select(x, s, keep)  # noqa: E731
    out = fn()
    if not real_sizes:  # float64, the exactness mode: the same indices as the reference
        assert out.shape == (x.shape[0], keep)
        xd, sd = x.double(), s.double()
        assert torch.equal(select(xd, sd, keep).cpu(), ref.vispruner_select(xd.cpu(), sd.cpu(), keep))
    record(_run(fn, device), device, op="vispruner_select", impl=impl, model=model, B=x.shape[0],
           N=x.shape[1], C=x.shape[2], keep=keep, dtype=str(x.dtype))
    benchmark(_run(fn, device))


@pytest.mark.parametrize("model", ["llava15", "llavanext"])
@pytest.mark.parametrize("impl", ["vtk", "published"])
@pytest.mark.parametrize("plus", [False, True], ids=["prumerge", "prumerge_plus"])
def test_prumerge(benchmark, record, device, real_sizes, plus, impl, model, batch):
    x, keys, s = inputs(model, batch, real_sizes, device)
    # per_sample=False: the published code pools the count over the batch; same work either way
    merge = (lambda *a: ops.prumerge(*a, 32, plus, False)) if impl == "vtk" else (lambda *a: published_prumerge(*a, plus))
    fn = lambda: merge(x, keys, s)  # noqa: E731
    fn()
    if not real_sizes:  # float64, the exactness mode, against the reference
        xd, kd, sd = x.double(), keys.double(), s.double()
        want, lengths = ref.prumerge(xd.cpu(), kd.cpu(), sd.cpu(), 32, plus, False)
        got = merge(xd, kd, sd)
        if impl == "vtk":
            assert torch.equal(got[1].cpu(), lengths)
            torch.testing.assert_close(got[0].cpu(), want, atol=1e-9, rtol=1e-9)
        elif not plus:  # PruMerge+ as published samples other positions (ALGORITHMS.md, fix)
            torch.testing.assert_close(got.cpu(), want, atol=1e-9, rtol=1e-9)
    record(_run(fn, device), device, op="prumerge_plus" if plus else "prumerge", impl=impl, model=model,
           B=x.shape[0], N=x.shape[1], C=x.shape[2], dtype=str(x.dtype))
    benchmark(_run(fn, device))
