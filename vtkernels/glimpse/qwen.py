"""Qwen2.5-VL pieces GlimpsePrune's inference and training share (ALGORITHMS.md "GlimpsePrune").

- ``inspect_qwen(model)``: the modules the glimpse prefill runs, found once (ValueError when the
  model is not a ``Qwen2_5_VLForConditionalGeneration`` this code can drive);
- ``image_dims(grid, merge)``: each image's merged grid (rows, cols) from ``image_grid_thw``;
- ``run_tower(parts, pixel_values, grid, blocks)``: the whole vision tower once; returns the
  merger's output (the LLM's image tokens, raster order of each image's merged grid, images one
  after another) and the VIP conditions: the outputs of the given vision blocks (deepest first;
  published 31, 23, 15, 7), each averaged over the 4 patches of a merge unit and mapped from the
  tower's window order back to raster order, exactly as the model maps the merger's output back.
- ``rope_positions(parts, input_ids, attention_mask, grid, mm_token_type_ids)``: the M-RoPE ids
  [3, B, T] of the unpruned sequence, from the model's own ``get_rope_index``.
"""
from __future__ import annotations

import inspect as _inspect_mod
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..hf.capture import window_index_of

__all__ = ["QwenGlimpseParts", "inspect_qwen", "check_decoder", "image_dims", "run_tower", "rope_positions"]


@dataclass
class QwenGlimpseParts:
    """The pieces of a Qwen2.5-VL model the glimpse prefill runs."""
    inner: nn.Module  # Qwen2_5_VLModel: get_rope_index, rope_deltas
    lm: nn.Module  # the language model: rotary_emb, norm, config
    layers: nn.ModuleList  # its decoder layers
    cache_kw: str  # the decoder layers' name for the cache ("cache" or, before 5.24, "past_key_values")
    embed: nn.Module
    visual: nn.Module
    blocks: nn.ModuleList  # vision blocks
    lm_head: nn.Module
    image_token_id: int
    video_token_id: Optional[int]
    num_heads: int  # LLM query heads
    merge: int  # spatial_merge_size


def inspect_qwen(model) -> QwenGlimpseParts:
    from transformers import Qwen2_5_VLForConditionalGeneration
    if type(model) is not Qwen2_5_VLForConditionalGeneration:
        raise ValueError(f"expected Qwen2_5_VLForConditionalGeneration, got {type(model).__name__}")
    cfg = model.config
    inner = model.model
    visual = getattr(inner, "visual", None)
    blocks = getattr(visual, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise ValueError("Qwen2.5-VL: the vision tower has no blocks (this transformers version is not supported)")
    if not hasattr(visual, "permute_input_for_window_attn"):
        raise ValueError("this transformers version's Qwen2.5-VL tower has no permute_input_for_window_attn "
                         "(window order): not supported")
    if not callable(getattr(inner, "get_rope_index", None)):
        raise ValueError(f"{type(inner).__name__} has no get_rope_index: this transformers version is not supported")
    lm = inner.language_model
    tc = cfg.text_config
    types = set(getattr(tc, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"}:
        raise ValueError(f"GlimpsePrune needs full attention in every LLM layer, the config has {sorted(types)} "
                         "(use_sliding_window is not supported)")
    layers = lm.layers
    cache_kw = check_decoder(lm)
    return QwenGlimpseParts(inner=inner, lm=lm, layers=layers, cache_kw=cache_kw, embed=model.get_input_embeddings(),
                            visual=visual, blocks=blocks, lm_head=model.lm_head, image_token_id=int(cfg.image_token_id),
                            video_token_id=getattr(cfg, "video_token_id", None),
                            num_heads=int(tc.num_attention_heads), merge=int(cfg.vision_config.spatial_merge_size))


def check_decoder(lm: nn.Module) -> str:
    """Checks that a language model is one the glimpse prefill can drive layer by layer (rotary_emb,
    norm, layers with self_attn.q_proj and scaling); returns the layers' name for the cache
    ("cache", or "past_key_values" before transformers 5.24)."""
    for name in ("rotary_emb", "norm", "layers"):
        if not hasattr(lm, name):
            raise ValueError(f"language model {type(lm).__name__} has no {name}: not a Llama-style decoder")
    for i, layer in enumerate(lm.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not hasattr(attn, "q_proj") or not hasattr(attn, "scaling"):
            raise ValueError(f"decoder layer {i} is not Llama-style (self_attn.q_proj, scaling)")
    params = _inspect_mod.signature(lm.layers[0].forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def image_dims(grid: Tensor, merge: int) -> List[Tuple[int, int]]:
    """Merged grid (rows, cols) per image of ``image_grid_thw`` [n, 3] (one host read)."""
    if grid is None:
        raise ValueError("Qwen2.5-VL images need image_grid_thw (the processor returns it)")
    if grid.dim() != 2 or grid.shape[1] != 3:
        raise ValueError(f"image_grid_thw must be [images, 3], got {tuple(grid.shape)}")
    dims = []
    for t, h, w in grid.tolist():
        if t != 1:
            raise ValueError(f"image_grid_thw has t={t}: an image is one temporal patch (videos are not "
                             "supported under GlimpsePrune)")
        if h % merge or w % merge:
            raise ValueError(f"image grid {h}x{w} is not a whole number of {merge}x{merge} merge units")
        dims.append((h // merge, w // merge))
    return dims


def _output(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def run_tower(parts: QwenGlimpseParts, pixel_values: Tensor, grid: Tensor,
              blocks: Sequence[int]) -> Tuple[Tensor, List[Tensor]]:
    """(merged [U, H], conditions [U, C] per block in ``blocks``' order), U = all merge units of
    the call, raster order per image. Block indices may be negative (from the end)."""
    depth = len(parts.blocks)
    want = [b % depth for b in blocks]
    got: dict = {}
    hooks = []

    def keep(idx):
        def hook(_m, _a, out):
            got[idx] = _output(out)
        return hook

    for b in sorted(set(want)):
        hooks.append(parts.blocks[b].register_forward_hook(keep(b)))
    try:
        with window_index_of(parts.visual, got):
            out = parts.visual(pixel_values.type(parts.visual.dtype), grid_thw=grid)
    finally:
        for h in hooks:
            h.remove()
    if "window_index" not in got or any(b not in got for b in want):
        raise RuntimeError("the vision tower did not run the blocks GlimpsePrune reads")
    merged = getattr(out, "pooler_output", None)
    if merged is None:
        raise RuntimeError("the Qwen2.5-VL tower returned no pooler_output (merged tokens): not supported")
    u = parts.merge * parts.merge
    back = torch.argsort(got["window_index"].to(merged.device))
    conds = []
    for b in want:
        x = got[b]
        S, C = x.shape[-2], x.shape[-1]
        if S % u:
            raise ValueError(f"{S} patches do not form whole {parts.merge}x{parts.merge} merge units")
        # A merge unit's patches are consecutive inside the tower; the window order moves whole units.
        conds.append(x.reshape(S // u, u, C).mean(dim=1)[back.to(x.device)])
    return merged, conds


def rope_positions(parts: QwenGlimpseParts, input_ids: Tensor, attention_mask: Optional[Tensor], grid: Tensor,
                   mm_token_type_ids: Optional[Tensor] = None) -> Tensor:
    """M-RoPE ids [3, B, T] of the unpruned sequence (the model's ``get_rope_index``; padding 0 or 1
    as it sets them, never read)."""
    mm = mm_token_type_ids
    if mm is None:  # as the processor makes them: 0 text, 1 image, 2 video
        mm = (input_ids == parts.image_token_id).long()
        if parts.video_token_id is not None:
            mm = mm + 2 * (input_ids == parts.video_token_id).long()
    pos, _ = parts.inner.get_rope_index(input_ids, mm_token_type_ids=mm, image_grid_thw=grid, video_grid_thw=None,
                                        attention_mask=attention_mask)
    return pos.to(input_ids.device).long()

