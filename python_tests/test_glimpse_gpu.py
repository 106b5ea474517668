"""GlimpsePrune end to end on a CUDA device (the GPU lane runs these: they carry the gpu mark).

Inference: the same float64 tiny models and heads on the CPU and on CUDA (the glimpse ops then
run their CUDA/Triton kernels) keep the same tokens and give the same logits and greedy tokens;
float32 and bfloat16 batches generate. Training: a few steps on CUDA under bf16 autocast (the
path `train` takes there) give finite losses, move the head and leave the model bit-identical.
"""
import os

import pytest
import torch
from torch.testing import assert_close

from vtkernels.glimpse import GlimpseDataset, apply_glimpse, evaluate, train

# VTK_GLIMPSE_TEST_DEVICE=cpu runs the file's logic on the CPU (a dry check of the tests themselves).
DEVICE = os.environ.get("VTK_GLIMPSE_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                                  reason="needs a CUDA device")]


def _family(family):
    """(model float64, processor, a head keeping about half of an image, a padded batch)."""
    if family == "llava":
        import test_glimpse as t
        model, proc = t.tiny_llava("llava", image_size=112, patch_size=14, vision_hidden=32, vision_layers=4,
                                   vision_heads=4, text_hidden=64, text_layers=4, seed=1)
        model = model.double()
        head = t.split_head(model, proc, seed=2)
        texts, groups = t.ragged_batch()
        batch = t.encode(proc, texts, [im for g in groups for im in g])
    else:
        import test_glimpse_qwen as t
        model, proc = t.tiny_qwen("qwen2_5_vl", text_layers=4, seed=21)
        model = model.double()
        head = t.split_head(model, proc, seed=2, sample=2)
        texts, groups = t.ragged_batch()
        batch = t.encode(proc, texts, [im for g in groups for im in g])
    return model, proc, head, batch


def _run(model, head, batch):
    with torch.no_grad(), apply_glimpse(model, head) as h:
        logits = model(**batch).logits
        kept = [k[0].tolist() for k in h.last_kept]
        gen = model.generate(**batch, max_new_tokens=4, do_sample=False)
    return logits, kept, gen


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_cuda_equals_cpu_in_float64(family):
    model, _, head, batch = _family(family)
    want = _run(model, head, batch)
    model, head = model.to(DEVICE), head.to(DEVICE)
    got = _run(model, head, batch.to(DEVICE))
    assert got[1] == want[1] and len({len(k) for k in want[1]}) > 1
    assert_close(got[0].cpu(), want[0], atol=1e-9, rtol=1e-8)
    assert torch.equal(got[2].cpu(), want[2])


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_lower_precision_generates(family, dtype):
    model, _, head, batch = _family(family)
    model, head = model.to(DEVICE, dtype), head.to(DEVICE, dtype)
    batch = batch.to(DEVICE)
    T = batch["input_ids"].shape[1]
    with torch.no_grad(), apply_glimpse(model, head) as h:
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
        assert all(n >= 1 for n in h.last_lengths)
    assert torch.equal(out[:, :T], batch["input_ids"])


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_cuda_training_bf16(family, tmp_path):
    if family == "llava":
        import test_glimpse_train as t
        model, proc = t.tiny(seed=0)
        rows = t.write_synthetic(str(tmp_path), 12, 0, "train.jsonl")
    else:
        import test_glimpse_train_qwen as t
        model, proc = t.tiny(seed=0)
        rows = t.synthetic(str(tmp_path), 12, 0, "train.jsonl")
    model = model.to(DEVICE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = GlimpseDataset.from_source(rows, str(tmp_path), proc, model, report=None)
    head = t.make_head(model, seed=0)
    start = {k: v.detach().clone() for k, v in head.state_dict().items()}
    result = train(model, head, data, steps=3, batch_size=2, lr=3e-3, progress=False)  # bf16 on CUDA
    assert all(all(torch.isfinite(torch.tensor(r[k])) for k in ("loss", "lm", "dice", "bce")) for r in result.history)
    assert any(not torch.equal(v, head.state_dict()[k]) for k, v in start.items())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    scores = evaluate(model, head, data, max_samples=4)
    assert 0.0 <= scores["dice"] <= 1.0 and scores["samples"] == 4
