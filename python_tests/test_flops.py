"""vtkernels.flops against torch's FLOP counter on real forward passes, and against the published
LLaVA-1.5-7B figures.

The counter sees every matmul a forward runs (eager attention, so QK^T and AV are matmuls too);
the formula must give the same number for the unpruned model and for each pruned one. The one
known difference: older transformers compute rotary angles with a small matmul (head_dim x S
FLOPs per forward), which the formula leaves out with the other element-wise work.
"""
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import vtkernels.hf as vhf
from vtkernels.cli import tiny_llava
from vtkernels.flops import llava_1_5_7b_config, prefill_flops, vision_layers_run

PROMPT = "user : <image> what is this ? assistant :"


def counted(model, inputs) -> int:
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        model(**inputs, logits_to_keep=1)
    return fc.get_total_flops()


@pytest.fixture(scope="module")
def llava():
    model, proc = tiny_llava("llava", image_size=112, patch_size=14, vision_hidden=32, vision_layers=3,
                             text_hidden=64, text_layers=2, seed=3)
    model.set_attn_implementation("eager")
    inputs = proc(images=Image.new("RGB", (100, 90), (200, 40, 40)), text=PROMPT, return_tensors="pt")
    return model, inputs


@pytest.mark.parametrize("method,opts", [(None, {}), ("fopru_rank", {"keep": 10}), ("fopru_row", {"keep": 16}),
                                         ("vispruner", {"keep": 7}), ("prumerge", {}), ("prumerge_plus", {})])
def test_formula_counts_what_runs(llava, method, opts):
    model, inputs = llava
    N = 64
    text = inputs["input_ids"].shape[1] - N
    if method is None:
        got, visual = counted(model, inputs), N
    else:
        with vhf.pruning(model, method, **opts) as h:
            got = counted(model, inputs)
        visual = h.last_lengths[0]
    want = prefill_flops(model.config, visual, text, vision_layers=vision_layers_run(model.config, method))
    assert want.vision > 0 and want.projector > 0 and want.language > 0
    assert got == pytest.approx(want.total, rel=2e-4)


def test_formula_llava_next_crops():
    model, proc = tiny_llava("llava_next", image_size=56, patch_size=14, vision_hidden=32, vision_layers=3,
                             text_hidden=64, text_layers=2, seed=4)
    model.set_attn_implementation("eager")
    inputs = proc(images=Image.new("RGB", (90, 50), (20, 90, 200)), text=PROMPT, return_tensors="pt")
    n_img = int((inputs["input_ids"] == model.config.image_token_id).sum())
    text = inputs["input_ids"].shape[1] - n_img
    crops = inputs["pixel_values"].shape[1]
    # Unpruned, Hugging Face projects every crop's 16 tokens, padding included.
    want = prefill_flops(model.config, n_img, text, crops=crops, projected_tokens=crops * 16)
    assert counted(model, inputs) == pytest.approx(want.total, rel=2e-4)
    with vhf.pruning(model, "vispruner", keep=4) as h:
        got = counted(model, inputs)
    want = prefill_flops(model.config, h.last_lengths[0], text, crops=crops,
                         projected_tokens=h.last_projected[0],
                         vision_layers=vision_layers_run(model.config, "vispruner"))
    assert got == pytest.approx(want.total, rel=2e-4)


def test_llava_1_5_7b_against_published_figures():
    cfg = llava_1_5_7b_config()
    full = prefill_flops(cfg, 576, 0)
    # The 7B language model: about 2 x 6.6e9 parameters per token.
    assert full.language / 576 == pytest.approx(2 * 6.6e9, rel=0.05)
    # PruMerge: 9.3 TFLOPs down to 0.91 at 32 tokens, a factor 10.2 (the published figures count
    # the visual tokens only: no text tokens).
    merged = prefill_flops(cfg, 32 + 1, 0, vision_layers=vision_layers_run(cfg, "prumerge"))
    assert full.total / merged.total == pytest.approx(9.3 / 0.91, rel=0.03)
    # VisPruner: 91% fewer FLOPs (32 tokens).
    vp = prefill_flops(cfg, 32, 0, vision_layers=vision_layers_run(cfg, "vispruner"))
    assert 1 - vp.total / full.total == pytest.approx(0.91, abs=0.01)
    assert "TFLOPs" in str(full)


# ----------------------------------------------------------------------------- Qwen2.5-VL, Qwen3-VL

def _qwen_case(family):
    from vtkernels.cli import tiny_qwen
    model, proc = tiny_qwen(family, seed=5)
    model.set_attn_implementation("eager")
    img = "<|vision_start|><|image_pad|><|vision_end|>"
    # Two images of different sizes in one prompt; the larger spans several 2 x 2-unit windows with
    # partial ones at the edge (Qwen2.5-VL).
    images = [Image.new("RGB", (150, 100), (200, 40, 40)), Image.new("RGB", (60, 90), (20, 90, 200))]
    inputs = proc(images=images, text=[f"user : {img} {img} what is this ? assistant :"])
    return model, inputs


def counted_apart(model, inputs, monkeypatch):
    """FLOPs of a forward, minus what the scoring op itself counts (the formula leaves the pruning
    ops out; the op may be served by a reference that multiplies matrices)."""
    from vtkernels import ops
    inner = []
    real = ops.attention_received_varlen

    def apart(*a, **kw):
        with FlopCounterMode(display=False) as fc:
            out = real(*a, **kw)
        inner.append(fc.get_total_flops())
        return out

    monkeypatch.setattr(ops, "attention_received_varlen", apart)
    return counted(model, inputs) - sum(inner)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_formula_counts_qwen_prefill(family, monkeypatch):
    model, inputs = _qwen_case(family)
    grids = inputs["image_grid_thw"]
    n_img = int((inputs["input_ids"] == model.config.image_token_id).sum())
    text = inputs["input_ids"].shape[1] - n_img
    want = prefill_flops(model.config, n_img, text, grids=grids)
    assert want.vision > 0 and want.projector > 0 and want.language > 0
    assert counted(model, inputs) == pytest.approx(want.total, rel=2e-4)
    for method, opts in (("fopru_rank", {"keep": 5}), ("vispruner", {"keep": 3}), ("prumerge_plus", {"knn": 4})):
        with vhf.pruning(model, method, **opts) as h:
            got = counted_apart(model, inputs, monkeypatch)
        want = prefill_flops(model.config, sum(h.last_lengths), text, grids=grids)
        assert got == pytest.approx(want.total, rel=2e-4)
    assert vision_layers_run(model.config, "fopru_rank") == model.config.vision_config.depth


def test_qwen_formula_needs_grids():
    model, _ = _qwen_case("qwen2_5_vl")
    with pytest.raises(ValueError, match="grids"):
        prefill_flops(model.config, 10, 10)
