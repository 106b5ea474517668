"""VtkLlavaForConditionalGeneration: vLLM's LLaVA-1.5 with the vtk fixed-budget methods.

A tiny LLaVA with random weights (8 x 8 patches, 3 CLIP layers, feature layer -2) is built from a
config and saved; vLLM loads it into its own model class on the CPU. Its embedding step is
compared with vtkernels.hf on the very same weights: same kept positions, same projected tokens.
"""
import pytest

pytest.importorskip("vllm", reason="the vLLM plugin tests need vllm (make test-vllm)")
import torch
from torch.testing import assert_close

from conftest import engine_config, load_model, picture, process, processor

import vtkernels.hf as vhf
from vtkernels.cli import tiny_llava
from vtkernels.vllm.testing import save_for_vllm

ARCH = "VtkLlavaForConditionalGeneration"
N = 64  # 112 px / 14 px = 8 x 8 patches
PROMPT = "user : <image> what is this ? <image> and this ? assistant :"
FIXED = {"fopru_rank": {"keep": 12}, "fopru_row": {"keep": 12}, "vispruner": {"keep": 12},
         "vispruner_opts": {"keep": 20, "important_ratio": 0.25, "dedup_step": 3}}
# float32 on both sides, different attention kernels (vLLM's encoder attention, HF's SDPA)
TOL = dict(atol=2e-5, rtol=1e-4)


IMAGES = [picture(1, 90, 120), picture(2, 130, 100)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(directory vLLM loads, the same model in transformers, its processor)."""
    model, proc = tiny_llava("llava", image_size=112, patch_size=14, vision_hidden=32, vision_layers=3,
                             vision_heads=4, text_hidden=64, text_layers=2, seed=1)
    d = save_for_vllm(model, proc, tmp_path_factory.mktemp("tiny_llava"))
    return d, model.float().eval(), proc


def hf_pruned(model, proc, pixel_values, method, opts):
    """vtkernels.hf on the transformers model fed the same pixels: (kept positions per image,
    projected kept tokens)."""
    inputs = proc(images=IMAGES, text=[PROMPT], return_tensors="pt")
    # vLLM runs the image processor its own way (it loads the fast one from the directory); the
    # embedding steps are compared on the same pixels.
    assert inputs["pixel_values"].shape == pixel_values.shape
    inputs["pixel_values"] = pixel_values
    got = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: got.append(out))
    try:
        with vhf.pruning(model, method, **opts) as h, torch.no_grad():
            model(**inputs)
            kept = [crops[0] for crops in h.last_kept]
    finally:
        hook.remove()
    assert len(got) == 1
    return kept, got[0]


# ----------------------------------------------------------------------------- processor

@pytest.mark.parametrize("keep", [1, 12, N])
def test_processor_emits_keep_placeholders_per_image(tiny, keep):
    d, _, hf_proc = tiny
    cfg = engine_config(d, ARCH, {"method": "fopru_rank", "keep": keep})
    proc = processor(cfg)
    image_id = cfg.model_config.hf_config.image_token_index
    sizes = [(90, 120), (130, 100), (336, 20), (7, 9), (112, 112)]
    images = [picture(i, h, w) for i, (h, w) in enumerate(sizes)]
    prompt = "user : " + " ".join(["<image> and"] * len(images)) + " ? assistant :"
    ids, ranges, kwargs = process(proc, prompt, images)
    assert [r.length for r in ranges] == [keep] * len(images)
    assert sum(1 for t in ids if t == image_id) == keep * len(images)
    for r in ranges:
        assert ids[r.offset:r.offset + r.length] == [image_id] * keep
    # The text around the images is the prompt's own tokens.
    text_ids = hf_proc.tokenizer(prompt)["input_ids"]
    assert [t for t in ids if t != image_id] == [t for t in text_ids if t != image_id]
    assert len(kwargs) == len(images)
    assert proc.info.get_max_image_tokens() == keep


def test_unpruned_class_emits_every_patch(tiny):
    """The same checkpoint under vLLM's own class: one placeholder per patch (what the plugin
    changes is only the count)."""
    d, _, _ = tiny
    cfg = engine_config(d, "LlavaForConditionalGeneration", None)
    _, ranges, _ = process(processor(cfg), PROMPT, IMAGES)
    assert [r.length for r in ranges] == [N, N]


# ----------------------------------------------------------------------------- embedding step

@pytest.fixture(scope="module")
def pruned_models(tiny):
    d = tiny[0]
    out = {}
    for name, opts in FIXED.items():
        method = name.split("_opts")[0]
        cfg = engine_config(d, ARCH, {"method": method, **opts})
        out[name] = (cfg, load_model(cfg), processor(cfg))
    return out


@pytest.mark.parametrize("name", list(FIXED))
def test_embedding_step_matches_hf_adapter(tiny, pruned_models, name):
    _, hf_model, hf_proc = tiny
    method, opts = name.split("_opts")[0], FIXED[name]
    cfg, model, proc = pruned_models[name]
    ids, ranges, kwargs = process(proc, PROMPT, IMAGES)
    pixel_values = torch.stack([item["pixel_values"].data for item in kwargs])

    hf_kept, hf_tokens = hf_pruned(hf_model, hf_proc, pixel_values, method, opts)

    from vllm.config import set_current_vllm_config
    with set_current_vllm_config(cfg), torch.no_grad():
        embeds = model.embed_multimodal(pixel_values=pixel_values)
        _, kept = model.vtk_select(pixel_values)
    keep = opts["keep"]
    assert embeds.shape == (2, keep, cfg.model_config.hf_config.text_config.hidden_size)
    assert [r.length for r in ranges] == [keep, keep]  # exactly one embedding per placeholder
    for i in range(2):
        assert kept[i].tolist() == hf_kept[i].tolist(), f"image {i}"
        assert kept[i].tolist() == sorted(set(kept[i].tolist()))
    assert_close(embeds.reshape(-1, embeds.shape[-1]), hf_tokens.reshape(-1, hf_tokens.shape[-1]), **TOL)


def test_keep_all_equals_unpruned_vllm_model(tiny):
    d = tiny[0]
    pruned_cfg = engine_config(d, ARCH, {"method": "vispruner", "keep": N})
    plain_cfg = engine_config(d, "LlavaForConditionalGeneration", None)
    pruned, plain = load_model(pruned_cfg), load_model(plain_cfg)
    _, _, kwargs = process(processor(pruned_cfg), PROMPT, IMAGES)
    pixel_values = torch.stack([item["pixel_values"].data for item in kwargs])
    from vllm.config import set_current_vllm_config
    with torch.no_grad():
        with set_current_vllm_config(pruned_cfg):
            got = pruned.embed_multimodal(pixel_values=pixel_values)
        with set_current_vllm_config(plain_cfg):
            want = plain.embed_multimodal(pixel_values=pixel_values)
    assert_close(got, want, atol=0, rtol=0)


def test_text_only_prompt_has_no_embeddings(pruned_models):
    cfg, model, _ = pruned_models["vispruner"]
    from vllm.config import set_current_vllm_config
    with set_current_vllm_config(cfg):
        assert list(model.embed_multimodal()) == []


def test_selection_reads_hooked_feature_layer_only(pruned_models):
    """q and k come from the last layer vLLM built (the feature layer), taken by a hook on the
    fused qkv_proj; the hook is gone afterwards."""
    cfg, model, proc = pruned_models["fopru_rank"]
    layers = model.vision_tower.vision_model.encoder.layers
    assert len(layers) == 2  # 3-layer tower, feature layer -2: vLLM builds layers 0 and 1
    _, _, kwargs = process(proc, PROMPT, IMAGES[:1])
    pixel_values = torch.stack([item["pixel_values"].data for item in kwargs])
    from vllm.config import set_current_vllm_config
    with set_current_vllm_config(cfg), torch.no_grad():
        x, q, k = model._vtk_tower(pixel_values)
        # Recompute the feature layer's q/k from its input by hand.
        hidden = model.vision_tower.vision_model.pre_layrnorm(
            model.vision_tower.vision_model.embeddings(pixel_values))
        hidden = layers[0](hidden)
        qkv, _ = layers[1].self_attn.qkv_proj(layers[1].layer_norm1(hidden))
        want_q, want_k, _ = qkv.chunk(3, dim=-1)
        out = layers[1](hidden)
    assert_close(q, want_q, atol=0, rtol=0)
    assert_close(k, want_k, atol=0, rtol=0)
    assert_close(x, out[:, 1:], atol=0, rtol=0)
    assert not layers[1].self_attn.qkv_proj._forward_hooks


# ----------------------------------------------------------------------------- bad options

BAD = [
    (None, "needs the pruning method"),
    ({"method": "prumerge"}, "placeholder count"),
    ({"method": "prumerge_plus", "knn": 8}, "placeholder count"),
    ({"method": "glimpse"}, "placeholder count"),
    ({"method": "random", "keep": 4}, "unknown method 'random'"),
    ({"keep": 4}, "needs a 'method'"),
    ({"method": "fopru_rank"}, "needs 'keep'"),
    ({"method": "fopru_rank", "keep": 0}, r"'keep'=0 must be in 1\.\.64"),
    ({"method": "fopru_row", "keep": N + 1}, r"'keep'=65 must be in 1\.\.64"),
    ({"method": "fopru_row", "keep": 2.5}, "'keep' must be an int"),
    ({"method": "vispruner", "keep": 4, "important_ratio": 1.5}, "important_ratio"),
    ({"method": "vispruner", "keep": 4, "dedup_step": 0}, "dedup_step"),
    ({"method": "fopru_rank", "keep": 4, "important_ratio": 0.5}, "unknown"),
    ("vispruner", "must be a dict"),
]


@pytest.mark.parametrize("pruning,message", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_options_fail_at_engine_start(tiny, pruning, message):
    """Model construction (in each worker) and the processor (profiling, first request) both
    refuse, before any weight is allocated or any prompt is processed."""
    d = tiny[0]
    cfg = engine_config(d, ARCH, pruning)
    with pytest.raises(ValueError, match=message):
        load_model(cfg)
    with pytest.raises(ValueError, match=message):
        processor(cfg).info.get_max_image_tokens()


def test_model_that_cannot_be_scored_fails_at_engine_start(tiny):
    d = tiny[0]
    from vllm.engine.arg_utils import EngineArgs
    args = EngineArgs(model=str(d), dtype="float32", enforce_eager=True, max_model_len=1024,
                      hf_overrides={"architectures": [ARCH], "vision_feature_select_strategy": "full",
                                    "vtk_pruning": {"method": "vispruner", "keep": 8}})
    cfg = args.create_engine_config()
    with pytest.raises(ValueError, match="vision_feature_select_strategy='default'"):
        load_model(cfg)
