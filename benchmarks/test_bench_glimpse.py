"""GlimpsePrune's ops: vtk kernels against the eager PyTorch way of doing the same.

gather_cache: after layer K the key/value cache of layers 0..K is cut down to the kept tokens
(ALGORITHMS.md, GlimpsePrune step 5). Eager baseline ("loop"): per layer, keys and values each,
`index_select` along the sequence, one call per batch row, stacked. vtk: one gather_cache call
for all 2 (K + 1) tensors. Real sizes (--benchmark): a 7B cache (32 layers, K = 21: layers 0..21,
K and V each: 44 tensors), head_dim 128, 32 KV heads (LLaVA-1.5-7B) or 8 (a GQA model), L = 700
(576 image tokens and a prompt), M = 70 or 350 kept positions (sorted, as the pruning keeps
them), B = 1 (the published code runs batch 1). Smoke mode: 3 layers of a tiny cache.

glimpse_logits: the glimpse's query row against layer K's keys. Eager baseline ("eager"): keys
repeated to the query heads (repeat_interleave), einsum, masked log_softmax in float32. Real
sizes: LLaVA-1.5-7B (32 heads, no GQA) and Qwen2.5-VL-7B (28 query heads, 4 KV heads), head_dim
128, L = 700, B = 1, 8, 64 on CUDA and 1, 4 on the CPU. Smoke mode: tiny shapes, one run.

On CUDA when present (float16), else on the CPU (float32). Each smoke run checks its result
against the reference.
"""
import pytest
import torch

from vtkernels import ops
from vtkernels import reference as ref

from bench_util import sync


def dtype_for(device):
    return torch.float16 if device.type == "cuda" else torch.float32


# --- gather_cache --------------------------------------------------------------------------------

def loop_gather_cache(tensors, index):
    """The eager way: one index_select per tensor and batch row (index without -1 slots)."""
    return [torch.stack([t[b].index_select(t.dim() - 3, index[b]) for b in range(t.shape[0])]) for t in tensors]


def cache_shape(real, kv_heads):
    """(layers pruned x K/V, B, KV heads, L, head_dim)."""
    return (2 * 22, 1, kv_heads, 700, 128) if real else (2 * 3, 2, max(1, kv_heads // 16), 19, 16)


@pytest.mark.parametrize("kept", [70, 350])
@pytest.mark.parametrize("kv_heads", [32, 8], ids=lambda h: f"kv{h}")
@pytest.mark.parametrize("impl", ["vtk", "loop"])
def test_gather_cache(benchmark, record, device, real_sizes, impl, kv_heads, kept):
    n, B, H, L, D = cache_shape(real_sizes, kv_heads)
    M = kept if real_sizes else kept // 35 * 3  # smoke: 6 or 30 slots of 19 (repeats)
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = dtype_for(device)
    tensors = [torch.randn(B, H, L, D, generator=g).to(device, dtype) for _ in range(n)]
    if M <= L:
        index = torch.stack([torch.randperm(L, generator=g)[:M].sort().values for _ in range(B)]).to(device)
    else:
        index = torch.randint(0, L, (B, M), generator=g).to(device)
    fn = (lambda: ops.gather_cache(tensors, index)) if impl == "vtk" else (lambda: loop_gather_cache(tensors, index))
    out = fn()
    if not real_sizes:  # smoke mode: bit-exact
        want = ref.gather_cache([t.cpu() for t in tensors], index.cpu())
        assert all(torch.equal(o.cpu(), w) for o, w in zip(out, want))

    def run():
        fn()
        sync(device)

    bytes_moved = 2 * n * B * H * M * D * tensors[0].element_size() + B * M * 8
    record(run, device, op="gather_cache", impl=impl, tensors=n, B=B, kv_heads=H, L=L, D=D, M=M,
           dtype=str(dtype), bytes_moved=bytes_moved)
    benchmark(run)


# --- glimpse_logits ------------------------------------------------------------------------------

def eager_glimpse_logits(q, k, key_mask):
    """The eager row computation: keys repeated per query head, einsum, masked log_softmax."""
    Hq, Hkv, D = q.shape[1], k.shape[1], q.shape[2]
    kk = k.repeat_interleave(Hq // Hkv, dim=1)
    logits = torch.einsum("bhd,bhld->bhl", q.float(), kk.float()) * D ** -0.5
    return logits.masked_fill(~key_mask[:, None, :], -float("inf")).log_softmax(dim=-1)


MODELS = {"llava15-7b": (32, 32, 128), "qwen25vl-7b": (28, 4, 128)}  # (Hq, Hkv, head_dim)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("impl", ["vtk", "eager"])
def test_glimpse_logits(benchmark, record, device, real_sizes, impl, model, batch):
    Hq, Hkv, D = MODELS[model]
    L = 700 if real_sizes else 23
    if not real_sizes:
        Hq, Hkv, D = Hq // 4, Hkv // 4, 16
    B = batch
    g = torch.Generator(device="cpu").manual_seed(1)
    dtype = dtype_for(device)
    # The keys as a cache holds them: the first L positions of a longer preallocated buffer.
    k = torch.randn(B, Hkv, L + 64, D, generator=g).to(device, dtype)[:, :, :L]
    q = torch.randn(B, Hq, D, generator=g).to(device, dtype)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[:, : L // 10] = False  # left padding
    mask = mask.to(device)
    fn = (lambda: ops.glimpse_logits(q, k, None, mask, True)) if impl == "vtk" else \
        (lambda: eager_glimpse_logits(q, k, mask))
    out = fn()
    if not real_sizes:
        want = ref.glimpse_logits(q.cpu(), k.cpu(), None, mask.cpu(), True)
        torch.testing.assert_close(out.cpu(), want, atol=1e-4, rtol=1e-4)

    def run():
        fn()
        sync(device)

    record(run, device, op="glimpse_logits", impl=impl, model=model, B=B, Hq=Hq, Hkv=Hkv, L=L, D=D,
           dtype=str(dtype), bytes_moved=k.numel() * k.element_size())
    benchmark(run)


# --- the glimpse's own cost against the pruned prefill it buys ---------------------------------
#
# ISSUE target (GPU): the glimpse's own work (its row of logits, the VIP, the cache gather) under 3%
# of the pruned prefill of LLaVA-1.5-7B. A 7B model does not fit a small machine, so the prefill is
# measured part by part at the 7B shapes (random weights): one Llama decoder layer on the full
# sequence (S1 = 8 + 576 + 32 text/image tokens + the glimpse; it runs K + 1 = 22 times) and on the
# pruned one (S2 = 40 text + 58 kept = 10%; L - K - 1 = 10 times), the VIP on one 24 x 24 image
# (conditions 1024 wide), the glimpse row and the gather of 2 (K + 1) cache tensors + the hidden
# states to the S2 kept tokens. `count` in each record says how often the part runs per prefill;
# the overhead is (vip + row + gather) / (sum of count x median over the parts, the tower aside).
# Smoke mode: the same parts at toy sizes, one run each.

OVERHEAD_PARTS = ["layer_full", "layer_pruned", "vip", "row", "gather"]


def _overhead_sizes(real):
    if real:
        from vtkernels.flops import llava_1_5_7b_config
        return llava_1_5_7b_config(), 576, 40, 58, 21
    from vtkernels.cli import tiny_llava
    model, _ = tiny_llava("llava", image_size=112, patch_size=14, vision_hidden=32, vision_layers=4, text_hidden=64,
                          text_layers=4)
    return model.config, 64, 10, 6, 2


@pytest.mark.parametrize("part", OVERHEAD_PARTS)
def test_glimpse_overhead(benchmark, record, device, real_sizes, part):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from vtkernels.glimpse import GlimpseHead
    cfg, N, n_text, kept, K = _overhead_sizes(real_sizes)
    tc = cfg.text_config
    tc._attn_implementation = "sdpa"
    L, H, Hq = tc.num_hidden_layers, tc.hidden_size, tc.num_attention_heads
    D = H // Hq
    S1, S2 = n_text + N + 1, n_text + kept
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(2)
    torch.manual_seed(0)
    count = {"layer_full": K + 1, "layer_pruned": L - K - 1, "vip": 1, "row": 1, "gather": 1}[part]
    if part.startswith("layer"):
        S = S1 if part == "layer_full" else S2
        with torch.device(device):
            layer = LlamaDecoderLayer(tc, 0).to(dtype).eval()
            rope = LlamaRotaryEmbedding(tc)
        x = torch.randn(1, S, H, generator=g).to(device, dtype)
        pe = rope(x, torch.arange(S, device=device)[None])
        fn = lambda: layer(x, attention_mask=None, position_embeddings=pe)  # noqa: E731 (causal SDPA)
        sizes = dict(S=S)
    elif part == "vip":
        head = GlimpseHead.for_model(cfg, reduce_layer=K).to(device, dtype).eval()
        side = int(N ** 0.5)
        A = torch.randn(1, N, Hq, generator=g).to(device, dtype)
        conds = [torch.randn(1, N, cfg.vision_config.hidden_size, generator=g).to(device, dtype) for _ in range(4)]
        fn = lambda: head.predict(A, conds, (side, side))  # noqa: E731
        sizes = dict(N=N)
    elif part == "row":
        q = torch.randn(1, Hq, D, generator=g).to(device, dtype)
        k = torch.randn(1, tc.num_key_value_heads, S1, D, generator=g).to(device, dtype)
        mask = torch.ones(1, S1, dtype=torch.bool, device=device)
        fn = lambda: ops.glimpse_logits(q, k, None, mask, True)  # noqa: E731
        sizes = dict(S=S1)
    else:
        tensors = [torch.randn(1, S1, H, generator=g).to(device, dtype)] + [
            torch.randn(1, tc.num_key_value_heads, S1, D, generator=g).to(device, dtype) for _ in range(2 * (K + 1))]
        index = torch.randperm(S1, generator=g)[:S2].sort().values[None].to(device)
        fn = lambda: ops.gather_cache(tensors, index)  # noqa: E731
        sizes = dict(S=S1, M=S2, tensors=len(tensors))
    with torch.inference_mode():
        fn()

        def run():
            fn()
            sync(device)

        record(run, device, op="glimpse_overhead", part=part, count=count, model="llava15-7b" if real_sizes else "tiny",
               K=K, L=L, dtype=str(dtype), **sizes)
        benchmark(run)
