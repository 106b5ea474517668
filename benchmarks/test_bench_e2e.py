"""End to end: prefill latency and peak memory of a LLaVA model, unpruned and under each method.

One prefill = ``model(**inputs, logits_to_keep=1)`` as generate runs it: vision tower, pruning
(vtkernels.hf), projector, language model, the last position's logits.

Real sizes (--benchmark) on CUDA: a LLaVA-1.5-7B-shaped model (CLIP ViT-L/14-336, 7B Llama;
vtkernels.flops.llava_1_5_7b_config) with random weights in bf16; batch 1 and 8; FoPru (rank,
row) and VisPruner at 64, 128 and 192 kept tokens, PruMerge and PruMerge+ (adaptive count),
GlimpsePrune at 10% kept (an untrained head whose logits all fall below the threshold, so
min_keep = N / 10 decides: the VIP, the glimpse row and the cache gather all run; K = 21 of 32 on
the 7B shape, 2/3 of the depth on the small model). On
the CPU the same cases run on the small model (576 patches, narrow layers). Smoke mode (plain
``pytest benchmarks/``): the small model at 64 patches, batch 2, one run per case, the compaction
checked. Each record carries the prefill FLOPs from vtkernels.flops.
"""
import contextlib

import pytest
import torch

import vtkernels.hf as vhf
from vtkernels.flops import prefill_flops, vision_layers_run

from bench_util import sync

TEXT_BEFORE, TEXT_AFTER = 8, 32  # text tokens around the image: a short LLaVA-style prompt
KEEPS = (64, 128, 192)  # of 576; scaled to the patch count of the smoke model
CASES = [("unpruned", 0)] + [(m, k) for m in ("fopru_rank", "fopru_row", "vispruner") for k in KEEPS] \
    + [("prumerge", 0), ("prumerge_plus", 0), ("glimpse", 0)]
GLIMPSE_KEPT = 0.1  # of the image tokens


def pytest_generate_tests(metafunc):
    # The batch sizes (1 and 8) rather than the op suite's.
    if "e2e_batch" in metafunc.fixturenames:
        real = metafunc.config.getoption("--benchmark")
        sizes = [1, 8] if real else [2]
        metafunc.parametrize("e2e_batch", sizes, ids=[f"B{b}" for b in sizes])


@pytest.fixture(scope="module")
def e2e_model(real_sizes, device):
    """(model, label): 7B-shaped in bf16 on CUDA at real sizes, else the small model."""
    if real_sizes and device.type == "cuda":
        from transformers import LlavaForConditionalGeneration
        from vtkernels.flops import llava_1_5_7b_config
        torch.manual_seed(0)
        with torch.device(device):
            model = LlavaForConditionalGeneration._from_config(llava_1_5_7b_config(), dtype=torch.bfloat16)
        return model.eval(), "llava-1.5-7b-shaped bf16"
    from vtkernels.cli import tiny_llava
    size = 336 if real_sizes else 112
    model, _ = tiny_llava("llava", image_size=size, patch_size=14, vision_hidden=64, vision_layers=4,
                          text_hidden=128, text_layers=2, seed=0)
    return model.to(device).eval(), f"small ({(size // 14) ** 2} patches) float32"


def glimpse_head(model):
    """An untrained GlimpseHead for ``model`` (published K and conditions) whose logits all fall
    below the threshold: min_keep sets the kept count, while every part of the method runs."""
    from vtkernels.glimpse import GlimpseHead
    torch.manual_seed(0)
    head = GlimpseHead.for_model(model)
    with torch.no_grad():
        head.attn_fuser.attn_out_projs["3"].bias.fill_(-1e4)
    return head.eval()


def make_inputs(model, batch: int, device):
    cfg = model.config
    N = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    g = torch.Generator(device="cpu").manual_seed(batch)
    vocab, img = cfg.text_config.vocab_size, cfg.image_token_id

    def text(n):  # random ids, the image token skipped so none of them is a placeholder
        t = torch.randint(0, vocab - 1, (batch, n), generator=g)
        return t + (t >= img).long()

    ids = torch.cat([text(TEXT_BEFORE), torch.full((batch, N), cfg.image_token_id), text(TEXT_AFTER)], dim=1)
    S = cfg.vision_config.image_size
    pixels = torch.randn(batch, 3, S, S, generator=g).to(device, model.dtype)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels}, N


@pytest.mark.parametrize("method,keep", CASES, ids=[f"{m}-{k}" if k else m for m, k in CASES])
def test_prefill(benchmark, record, device, real_sizes, e2e_model, method, keep, e2e_batch):
    model, label = e2e_model
    inputs, N = make_inputs(model, e2e_batch, device)
    keep = max(1, keep * N // 576)
    opts = {} if method in ("unpruned", "prumerge", "prumerge_plus", "glimpse") else {"keep": keep}
    if method == "glimpse":
        opts = {"head": glimpse_head(model), "min_keep": max(1, round(GLIMPSE_KEPT * N))}
    ctx = contextlib.nullcontext() if method == "unpruned" else vhf.pruning(model, method, **opts)
    with ctx as handle, torch.inference_mode():
        out = model(**inputs, logits_to_keep=1)
        L = inputs["input_ids"].shape[1]
        visual = handle.last_lengths if handle else [N] * e2e_batch
        assert out.logits.shape[:2] == (e2e_batch, 1) and torch.isfinite(out.logits).all()
        if method in ("fopru_rank", "fopru_row", "vispruner"):
            assert visual == [keep] * e2e_batch
        if method == "glimpse":
            assert visual == [opts["min_keep"]] * e2e_batch
        if not real_sizes and handle:  # smoke: the compacted sequence is what the counts say
            full = model(**inputs)
            assert full.logits.shape[1] == L - N + max(visual)

        def run():
            model(**inputs, logits_to_keep=1)
            sync(device)

        cfg = model.config
        if method == "glimpse":
            from vtkernels.glimpse import prefill_flops as glimpse_flops
            flops = sum(glimpse_flops(cfg, TEXT_BEFORE + TEXT_AFTER, N, v, head=opts["head"]).total for v in visual)
        else:
            layers = vision_layers_run(cfg, None if method == "unpruned" else method)
            flops = sum(prefill_flops(cfg, v, TEXT_BEFORE + TEXT_AFTER, vision_layers=layers).total for v in visual)
        record(run, device, model=label, method=method, keep=keep if "keep" in opts else None, B=e2e_batch,
               visual_tokens=visual, text_tokens=TEXT_BEFORE + TEXT_AFTER, prefill_flops=flops,
               min_keep=opts.get("min_keep"),
               dtype=str(model.dtype))
        benchmark(run)
