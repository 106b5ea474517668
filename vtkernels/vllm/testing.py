"""Small random models for the vLLM plugin's tests and GPU check, built offline from configs.

No vLLM here: transformers builds the model, :func:`save_for_vllm` writes a directory that vLLM
loads. (LLaVA: ``vtkernels.cli.tiny_llava``; Qwen2.5-VL: :func:`tiny_qwen2_5_vl`.)
"""
from __future__ import annotations

from pathlib import Path

import torch

QWEN_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
QWEN_WORDS = "<pad> <unk> <s> </s> user assistant : ? . , a the is what this and picture".split()


def _word_tokenizer(words, specials):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(list(words) + list(specials))},
                                    unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=list(specials))


def tiny_qwen2_5_vl(*, depth: int = 4, vision_hidden: int = 32, vision_heads: int = 4,
                    fullatt_block_indexes=(1, 3), window_size: int = 112, text_hidden: int = 64,
                    text_layers: int = 2, max_units: int = 64, seed: int = 3):
    """(model, processor): a Qwen2.5-VL with random weights (14 px patches, 2 x 2 merge units,
    windows of window_size px) and a processor for it (images of at most ``max_units`` units)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    tok = _word_tokenizer(QWEN_WORDS, QWEN_SPECIALS)
    ids = {s: tok.convert_tokens_to_ids(s) for s in QWEN_SPECIALS}
    heads = 4
    half = text_hidden // heads // 2  # M-RoPE sections cover half the head dim
    hw = (half - half // 4) // 2  # the published split's proportions (16, 24, 24 of 64)
    section = [half - 2 * hw, hw, hw]
    cfg = Qwen2_5_VLConfig(
        vision_config=dict(depth=depth, hidden_size=vision_hidden, num_heads=vision_heads,
                           intermediate_size=2 * vision_hidden, out_hidden_size=text_hidden,
                           fullatt_block_indexes=list(fullatt_block_indexes), window_size=window_size,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           tokens_per_second=2),
        text_config=dict(hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                         num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=2,
                         vocab_size=len(tok), max_position_embeddings=4096,
                         rope_scaling={"type": "mrope", "mrope_section": section}, rope_theta=10000.0,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    pixels = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * max_units, patch_size=14, merge_size=2,
                  temporal_patch_size=2)
    proc = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tok,
                               video_processor=Qwen2VLVideoProcessor(**pixels),
                               chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    return model, proc


def save_for_vllm(model, processor, directory) -> Path:
    """``save_pretrained`` of both, in the layout vLLM 0.33 loads.

    transformers >= 5.20 writes a LLaVA's CLIP tower as ``vision_tower.*``; vLLM's LLaVA (like the
    published llava-hf checkpoints) reads ``vision_tower.vision_model.*``, so those keys are
    renamed. Other models are saved as they are.
    """
    from safetensors.torch import load_file, save_file
    d = Path(directory)
    model.save_pretrained(d)
    processor.save_pretrained(d)
    if getattr(model.config, "model_type", "") in ("llava",):
        for path in d.glob("*.safetensors"):
            sd = load_file(path)
            pre, full = "vision_tower.", "vision_tower.vision_model."
            sd = {(full + k[len(pre):] if k.startswith(pre) and not k.startswith(full) else k): v
                  for k, v in sd.items()}
            save_file(sd, path, metadata={"format": "pt"})
    return d


def qwen_reference(model, pixel_values, image_grid_thw, method: str, opts: dict):
    """A transformers Qwen2.5-VL pruned by hand with vtkernels.reference (ALGORITHMS.md, "Towers
    without CLS"), independently of vLLM: per image (kept raster positions in the merged grid,
    the merger's outputs at them). q and k of the score block are recomputed from that block's
    input, after the 2D rotary; scores and selection run in float64."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_window_index

    from .. import reference as ref
    pv, grid = pixel_values, image_grid_thw
    vis = model.model.visual
    blk = vis.blocks[vis.fullatt_block_indexes[-1]]
    got = {}

    def take_input(_m, args, kwargs):
        got["h"], got["rope"] = args[0], kwargs["position_embeddings"]

    handle = blk.register_forward_pre_hook(take_input, with_kwargs=True)
    try:
        with torch.no_grad():
            feats = model.model.get_image_features(pv, grid).pooler_output
    finally:
        handle.remove()
    H = vis.config.num_heads
    with torch.no_grad():
        h = blk.norm1(got["h"])
        S = h.shape[0]
        q, k, _ = blk.attn.qkv(h).reshape(S, 3, H, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *got["rope"])
        q, k = q.reshape(S, -1).double().cpu(), k.reshape(S, -1).double().cpu()
    grid = grid.cpu()
    cu = torch.cat([torch.zeros(1, dtype=torch.long), grid.prod(-1).cumsum(0)])
    patch = ref.attention_received_varlen(q, k, cu, H)  # the tower's window order
    window_index, _ = get_vision_window_index(grid, spatial_merge_size=vis.spatial_merge_size,
                                              window_size=vis.window_size, patch_size=vis.patch_size,
                                              kwargs={})
    unit_scores = torch.empty(S // vis.spatial_merge_size ** 2, dtype=patch.dtype)
    unit_scores[window_index.cpu()] = patch.view(unit_scores.shape[0], -1).mean(1)  # raster order
    out, start = [], 0
    for (_, _, w), x in zip(grid.tolist(), feats):
        n = x.shape[0]
        s = unit_scores[start:start + n]
        start += n
        keep = min(opts["keep"], n)
        x64 = x.double().cpu()[None]
        if method == "vispruner":
            idx = ref.vispruner_select(x64, s[None], keep, opts.get("important_ratio", 0.5),
                                       opts.get("dedup_step", 8))
        else:
            _, idx = ref.fopru_select(x64, s[None], keep, method.split("_")[1], w // vis.spatial_merge_size)
        out.append((idx[0], x[idx[0].to(x.device)]))
    return out


def qwen_pruned_forward_inputs(model, inputs, selections):
    """(input ids, inputs_embeds, M-RoPE position ids [3, 1, L']) of the pruned sequence, built
    from the unpruned processor output ``inputs`` (one prompt) and ``qwen_reference``'s kept
    units: each image keeps its kept units' own ids, text keeps its unpruned ids (ALGORITHMS.md).
    Also returns the unpruned sequence's next position (where decoding continues)."""
    cfg = model.config
    ids = inputs["input_ids"][0]
    full_pos, _ = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs.get("attention_mask"))
    cols, pieces, i, img = [], [], 0, 0
    is_img = (ids == cfg.image_token_id).tolist()
    while i < len(is_img):
        if not is_img[i]:
            cols.append(i)
            i += 1
            continue
        j = i
        while j < len(is_img) and is_img[j]:
            j += 1
        kept, _ = selections[img]
        cols += (i + kept.to(ids.device)).tolist()
        img, i = img + 1, j
    cols_t = torch.tensor(cols, device=ids.device)
    new_ids = ids[cols_t]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(new_ids[None])
        feats = torch.cat([t for _, t in selections]).to(embeds.dtype)
        embeds = embeds.masked_scatter((new_ids == cfg.image_token_id)[None, :, None], feats)
    return new_ids, embeds, full_pos[:, :, cols_t], int(full_pos.max()) + 1
