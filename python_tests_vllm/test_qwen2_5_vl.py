"""VtkQwen2_5_VLForConditionalGeneration: vLLM's Qwen2.5-VL with the vtk fixed-budget methods.

A tiny Qwen2.5-VL with random weights (vtkernels.vllm.testing: 4 vision blocks, full attention in
blocks 1 and 3, windows of 4 x 4 merge units) is built from a config and saved; vLLM loads it into
its model class on the CPU. The reference is the transformers model on the same weights, pruned by hand with
vtkernels.reference from the score block's q/k (ALGORITHMS.md, "Towers without CLS"); the
positions are checked through vLLM's own recompute_mrope_positions against the unpruned
sequence's M-RoPE ids.
"""
import pytest

pytest.importorskip("vllm", reason="the vLLM plugin tests need vllm (make test-vllm)")
import torch
from torch.testing import assert_close

from conftest import engine_config, load_model, picture, process, processor

from vtkernels.vllm.testing import qwen_reference, save_for_vllm, tiny_qwen2_5_vl

ARCH = "VtkQwen2_5_VLForConditionalGeneration"
PLAIN = "Qwen2_5_VLForConditionalGeneration"
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPT = f"user : {IMG} what is this ? {IMG} and this picture ? assistant :"
# 112 x 168 px -> 8 x 12 patches -> 4 x 6 = 24 merge units (wider than tall);
# 168 x 84 -> 12 x 6 patches -> 6 x 3 = 18 units (taller than wide); 56 x 84 -> 2 x 3 = 6 units
IMAGES = [picture(11, 112, 168), picture(12, 168, 84)]
FIXED = {"fopru_rank": {"keep": 10}, "fopru_row": {"keep": 10}, "vispruner": {"keep": 10},
         "vispruner_opts": {"keep": 14, "important_ratio": 0.25, "dedup_step": 3}}
PRUNE_SWITCH = {"video_pruning_rate": 0.5}  # vLLM's multimodal-pruning mode (see the model's doc)
TOL = dict(atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(directory vLLM loads, the same model in transformers, its processor)."""
    model, proc = tiny_qwen2_5_vl(seed=3)
    d = save_for_vllm(model, proc, tmp_path_factory.mktemp("tiny_qwen2_5_vl"))
    return d, model.float(), proc


def units_of(item):
    t, h, w = item["image_grid_thw"].data.tolist()
    return t * (h // 2) * (w // 2), h // 2, w // 2


def hf_reference(model, proc, method, opts):
    """The transformers model pruned by hand: per image (kept raster positions, kept tokens)."""
    inputs = proc(images=IMAGES, text=[PROMPT], return_tensors="pt")
    return qwen_reference(model, inputs["pixel_values"], inputs["image_grid_thw"], method, opts)


def embed(cfg, model, kwargs):
    from vllm.config import set_current_vllm_config
    pv = torch.cat([it["pixel_values"].data for it in kwargs])
    grid = torch.stack([it["image_grid_thw"].data for it in kwargs])
    with set_current_vllm_config(cfg), torch.no_grad():
        return model.embed_multimodal(pixel_values=pv, image_grid_thw=grid)


def features(ranges, kwargs):
    from vllm.multimodal.inputs import MultiModalFeatureSpec
    return [MultiModalFeatureSpec(data=it, modality="image", identifier=str(i), mm_position=r)
            for i, (it, r) in enumerate(zip(kwargs, ranges))]


# ----------------------------------------------------------------------------- processor

@pytest.mark.parametrize("keep", [1, 10, 18, 100])
def test_processor_emits_min_keep_units_placeholders(tiny, keep):
    d = tiny[0]
    cfg = engine_config(d, ARCH, {"method": "vispruner", "keep": keep}, **PRUNE_SWITCH)
    proc = processor(cfg)
    image_id = cfg.model_config.hf_config.image_token_id
    sizes = [(112, 168), (168, 84), (56, 84), (30, 400), (224, 224)]
    images = [picture(20 + i, h, w) for i, (h, w) in enumerate(sizes)]
    prompt = "user : " + " and ".join([IMG] * len(images)) + " ? assistant :"
    ids, ranges, kwargs = process(proc, prompt, images)
    units = [units_of(it)[0] for it in kwargs]
    assert len(set(units)) > 2  # the sizes really differ
    assert [r.length for r in ranges] == [min(keep, u) for u in units]
    assert sum(1 for t in ids if t == image_id) == sum(min(keep, u) for u in units)
    for r in ranges:
        assert ids[r.offset - 1] == cfg.model_config.hf_config.vision_start_token_id
        assert ids[r.offset:r.offset + r.length] == [image_id] * r.length
        assert ids[r.offset + r.length] == cfg.model_config.hf_config.vision_end_token_id
    assert proc.info.get_max_image_tokens() == min(keep, processor(
        engine_config(d, PLAIN, None)).info.get_max_image_tokens())


# ----------------------------------------------------------------------------- embedding step

@pytest.fixture(scope="module")
def pruned_models(tiny):
    d = tiny[0]
    out = {}
    for name, opts in FIXED.items():
        cfg = engine_config(d, ARCH, {"method": name.split("_opts")[0], **opts}, **PRUNE_SWITCH)
        out[name] = (cfg, load_model(cfg), processor(cfg))
    return out


@pytest.mark.parametrize("name", list(FIXED))
def test_embedding_step_matches_hand_pruned_hf_model(tiny, pruned_models, name):
    _, hf_model, hf_proc = tiny
    method, opts = name.split("_opts")[0], FIXED[name]
    cfg, model, proc = pruned_models[name]
    _, ranges, kwargs = process(proc, PROMPT, IMAGES)
    embeds = embed(cfg, model, kwargs)
    want = hf_reference(hf_model, hf_proc, method, opts)
    D = cfg.model_config.hf_config.text_config.hidden_size
    assert len(embeds) == 2
    for i, (e, r, it, (idx, tokens)) in enumerate(zip(embeds, ranges, kwargs, want)):
        n, gh, gw = units_of(it)
        assert e.shape == (min(opts["keep"], n), D + 4) == (r.length, D + 4)
        pos = e[:, D:].long()
        kept = pos[:, 1] * gw + pos[:, 2]
        assert kept.tolist() == idx.tolist(), f"image {i}"
        assert (pos[:, 0] == 0).all() and (pos[:, 3] == max(gh, gw)).all()
        assert_close(e[:, :D], tokens, **TOL)


def test_keep_all_equals_unpruned_vllm_model(tiny):
    """keep >= units: every unit, in raster order, as vLLM's own class returns it (whose 4th
    channel is the grid width: the same as ours for an image not taller than wide)."""
    d = tiny[0]
    images = [picture(11, 112, 168), picture(13, 56, 84)]
    pruned_cfg = engine_config(d, ARCH, {"method": "fopru_row", "keep": 24}, **PRUNE_SWITCH)
    plain_cfg = engine_config(d, PLAIN, None, **PRUNE_SWITCH)
    _, _, kwargs = process(processor(pruned_cfg), f"{IMG} {IMG}", images)
    got = embed(pruned_cfg, load_model(pruned_cfg), kwargs)
    want = embed(plain_cfg, load_model(plain_cfg), kwargs)
    for g, w in zip(got, want):
        assert_close(g, w, atol=0, rtol=0)


def test_kept_tokens_carry_their_unpruned_mrope_positions(tiny, pruned_models):
    """Prompt positions before the tower, then vLLM's recompute_mrope_positions with the
    embeddings: each kept unit has the (t, row, col) ids it has in the unpruned sequence, text
    keeps its ids, decoding continues after the unpruned last position; also when the prefill is
    chunked between the two images."""
    d = tiny[0]
    cfg, model, proc = pruned_models["vispruner"]
    ids, ranges, kwargs = process(proc, PROMPT, IMAGES)
    embeds = embed(cfg, model, kwargs)
    D = cfg.model_config.hf_config.text_config.hidden_size

    plain_cfg = engine_config(d, PLAIN, None)
    plain = load_model(plain_cfg)
    full_ids, full_ranges, full_kwargs = process(processor(plain_cfg), PROMPT, IMAGES)
    full_pos, full_delta = plain.get_mrope_input_positions(full_ids, features(full_ranges, full_kwargs))

    # The unpruned ids of the tokens the pruned prompt keeps.
    keep_cols = []
    prev_full = prev = 0
    for r, fr, e, it in zip(ranges, full_ranges, embeds, kwargs):
        keep_cols += range(prev_full, fr.offset)  # text before the image
        _, _, gw = units_of(it)
        pos = e[:, D:].long()
        keep_cols += (fr.offset + pos[:, 1] * gw + pos[:, 2]).tolist()
        prev_full, prev = fr.offset + fr.length, r.offset + r.length
    keep_cols += range(prev_full, len(full_ids))
    want = full_pos[:, keep_cols]
    assert want.shape[1] == len(ids)

    start, delta = model.get_mrope_input_positions(ids, features(ranges, kwargs))
    assert start.shape == (3, len(ids))
    text = torch.tensor([t not in (cfg.model_config.hf_config.image_token_id,) for t in ids])
    assert torch.equal(start[:, text], want[:, text])  # text ids are final before the tower runs
    assert len(ids) + delta == len(full_ids) + full_delta  # decoding resumes where unpruned does

    got, new_delta = model.recompute_mrope_positions(ids, list(embeds), start.clone(), 0)[1:]
    assert torch.equal(got, want)
    assert new_delta == delta

    # Chunked prefill, the chunk boundary anywhere: each chunk gets what vLLM's runner passes,
    # the rows of the media items (or parts of them) inside the chunk.
    for b in range(1, len(ids)):
        pos = start.clone()
        for lo, hi in ((0, b), (b, len(ids))):
            window = [e[max(lo, r.offset) - r.offset:min(hi, r.offset + r.length) - r.offset]
                      for r, e in zip(ranges, embeds) if max(lo, r.offset) < min(hi, r.offset + r.length)]
            cleaned, pos, d_chunk = model.recompute_mrope_positions(ids, window, pos, lo)
            assert [c.shape[1] for c in cleaned] == [D] * len(window)
            assert d_chunk == delta
        assert torch.equal(pos, want), f"chunk boundary at token {b}"


# ----------------------------------------------------------------------------- bad options

BAD = [
    ({"method": "prumerge"}, PRUNE_SWITCH, "placeholder count"),
    ({"method": "prumerge_plus"}, PRUNE_SWITCH, "placeholder count"),
    ({"method": "glimpse", "keep": 3}, PRUNE_SWITCH, "placeholder count"),
    ({"method": "fopru_rank", "keep": 0}, PRUNE_SWITCH, r"'keep'=0 must be in >= 1"),
    ({"method": "vispruner", "keep": 8, "knn": 3}, PRUNE_SWITCH, "unknown"),
    (None, PRUNE_SWITCH, "needs the pruning method"),
    ({"method": "vispruner", "keep": 8}, {}, "video_pruning_rate > 0"),
    ({"method": "vispruner", "keep": 8}, {"video_pruning_rate": 0.5, "mm_encoder_tp_mode": "data"},
     "mm_encoder_tp_mode='data'"),
]


@pytest.mark.parametrize("pruning,engine,message", BAD, ids=[f"{b[0]}-{sorted(b[1])}" for b in BAD])
def test_bad_options_fail_at_engine_start(tiny, pruning, engine, message):
    d = tiny[0]
    cfg = engine_config(d, ARCH, pruning, **engine)
    with pytest.raises(ValueError, match=message):
        load_model(cfg)


def test_precomputed_image_embeds_are_refused(pruned_models):
    cfg, model, _ = pruned_models["vispruner"]
    from vllm.config import set_current_vllm_config
    with set_current_vllm_config(cfg), pytest.raises(ValueError, match="image_embeds cannot be pruned"):
        model.embed_multimodal(image_embeds=torch.zeros(6, 64), image_grid_thw=torch.tensor([[1, 4, 6]]))
