"""Qwen2.5-VL in vLLM, pruned to at most ``keep`` merge units per image.

Imported by vLLM lazily (see ``vtkernels.vllm.register``), never at plugin load.

- Placeholders: per image, min(keep, merge units) image tokens (an image with at most ``keep``
  units keeps them all). Videos are left to vLLM (EVS at ``video_pruning_rate``).
- Embedding step: vLLM's tower runs unchanged; a pre-hook on the score block's attention module
  (``fullatt_block_indexes[-1]``; ALGORITHMS.md, "Towers without CLS") takes its q and k after
  the 2D rotary, as they enter vLLM's fused encoder attention. The scores are the attention each
  patch receives within its image (``attention_received_varlen``), averaged over the 4 patches of
  a merge unit and mapped from the tower's window order back to raster order; the selection runs
  on the merger's outputs, per image, and only the kept units are returned.
- Positions: every kept unit keeps its own M-RoPE (t, row, col) ids, text keeps the ids it has in
  the unpruned sequence, decoding continues after the unpruned sequence's last position. vLLM
  computes a request's M-RoPE positions from the prompt before the tower runs, and takes
  positions from the embedding step only in its multimodal-pruning mode (the one EVS uses):
  there each media embedding carries 4 extra channels (t, row, col, extent) that
  ``recompute_mrope_positions`` (a method of the model, which the runner calls) turns into the
  sequence's positions. That mode is vLLM's switch ``video_pruning_rate > 0``, which this class
  therefore requires (engine start fails without it, saying so); with it, the kept units carry
  their own ids through vLLM's supported path, and nothing of vLLM's runner is patched. This
  class gives final text ids already before the tower runs, so its recompute only writes the
  media rows; vLLM's own recompute (EVS) also re-bases the text, which goes wrong when a
  prefill chunk ends between two media items and after an image taller than wide.
"""
from __future__ import annotations

from functools import partial
from typing import Dict, List

import numpy as np
import torch
from torch import Tensor

from vllm.config import VllmConfig
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement
from vllm.utils.gpu_sync_debug import gpu_sync_allowed

from .. import ops
from ._common import all_heads, hooked, need
from .options import PruningOptions, parse_options

ARCH = "VtkQwen2_5_VLForConditionalGeneration"


def qwen_options(hf_config) -> PruningOptions:
    v = hf_config.vision_config
    if not getattr(v, "fullatt_block_indexes", None):
        raise ValueError(f"{ARCH} scores with the tower's last full-attention block, but "
                         "vision_config.fullatt_block_indexes is empty")
    return parse_options(hf_config, ARCH)


def _check_engine(vllm_config: VllmConfig) -> None:
    """What the pruned model needs of the engine, checked at model construction (engine start)."""
    mm = vllm_config.model_config.multimodal_config
    if mm is None or not mm.is_multimodal_pruning_enabled():
        raise ValueError(
            f"{ARCH} returns the kept image tokens with their own M-RoPE positions, which vLLM 0.33 "
            "reads from the embedding step only in its multimodal-pruning mode, and that mode is on "
            "only when video_pruning_rate > 0. Pass video_pruning_rate (LLM(..., "
            "video_pruning_rate=R) or --video-pruning-rate R): videos are then pruned by vLLM's "
            "EVS at rate R, images by vtkernels. See docs/vllm.md.")
    if mm.mm_encoder_tp_mode == "data":
        raise ValueError(f"{ARCH} runs the vision tower itself and does not support "
                         "mm_encoder_tp_mode='data'; use the default 'weights'")
    if vllm_config.compilation_config.compile_mm_encoder:
        raise ValueError(f"{ARCH} reads q/k of the vision tower with module hooks, which a "
                         "torch.compile'd encoder bypasses; turn compile_mm_encoder off")


class VtkQwen2_5_VLProcessingInfo(Qwen2_5_VLProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int, image_processor,
                             mm_kwargs) -> int:
        # Also what profiling and the scheduler's encoder budget read as the maximum per image.
        units = super().get_num_image_tokens(image_width=image_width, image_height=image_height,
                                             image_processor=image_processor, mm_kwargs=mm_kwargs)
        return min(qwen_options(self.get_hf_config()).keep, units)


class VtkQwen2_5_VLMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        keep = qwen_options(self.info.get_hf_config()).keep
        merge = self.info.get_hf_config().vision_config.spatial_merge_size ** 2

        def image_tokens(item_idx: int, token_id: int) -> List[int]:
            grid = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data
            return [token_id] * min(keep, int(grid.prod()) // merge)

        out = []
        for u in updates:
            if u.modality == "image":
                (token_id,) = u.target
                u = PromptReplacement(modality="image", target=u.target,
                                      replacement=partial(image_tokens, token_id=token_id))
            out.append(u)
        return out


@MULTIMODAL_REGISTRY.register_processor(
    VtkQwen2_5_VLMultiModalProcessor,
    info=VtkQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class VtkQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL whose image embedding step returns the kept merge units, each with its
    own M-RoPE position channels."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        self.vtk_options = qwen_options(vllm_config.model_config.hf_config)
        _check_engine(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        score_block = self.visual.blocks[self.config.vision_config.fullatt_block_indexes[-1]]
        self._vtk_attn = score_block.attn

    # -- positions before the tower runs -------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens, mm_features):
        """M-RoPE ids of the prompt, whose images hold fewer placeholders than their grids.

        Text gets the ids of the unpruned sequence (after an image, text resumes past the image's
        whole grid), so the ids that do not depend on the selection are final here. An image's
        placeholders get its first grid positions for now: the embedding step hands back the
        kept units' own ids, and recompute_mrope_positions puts them in before the image's
        tokens are computed. Media keep the length their placeholder range has (a video pruned
        by vLLM's EVS too: its kept rows get their ids the same way, and the text after it keeps
        the unpruned sequence's ids, as after an image).
        """
        lengths = {f.mm_position.offset: f.mm_position.length for f in mm_features}
        pieces, st, next_id = [], 0, 0
        for offset, t, h, w, t_factor in self.iter_mm_grid_thw(mm_features):
            text = offset - st
            pieces.append(np.broadcast_to(np.arange(text), (3, text)) + next_id)
            grid = np.indices((t, h, w)).reshape(3, -1)
            if t_factor != 1.0:
                grid[0] = (grid[0] * t_factor).astype(np.int64)
            base = next_id + text
            n = lengths[offset]
            pieces.append(grid[:, :n] + base)
            next_id = base + int(grid.max()) + 1
            st = offset + n
        text = len(input_tokens) - st
        pieces.append(np.broadcast_to(np.arange(text), (3, text)) + next_id)
        positions = np.concatenate(pieces, axis=1)
        # Decoding continues after the unpruned sequence's last position (an image's whole grid
        # when the prompt ends with one).
        delta = next_id + text - len(input_tokens)
        return torch.from_numpy(np.ascontiguousarray(positions)), delta

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions,
                                  num_computed_tokens):
        """Called by vLLM's runner (multimodal-pruning mode) with the media embeddings of the
        tokens it schedules from ``num_computed_tokens`` on, in prompt order, the first possibly
        the rest of a media item begun in an earlier chunk: writes each embedding row's own ids
        (its 4 trailing channels: t, row, col, extent, relative to the media's start) into the
        media's placeholder slots. Text ids are final since get_mrope_input_positions, so they
        are left alone. Returns (embeddings without the channels, positions, delta)."""
        cfg = self.config
        with gpu_sync_allowed():  # the placeholder runs are found on the host
            ids = (input_ids.detach().cpu() if isinstance(input_ids, Tensor)
                   else torch.as_tensor(input_ids)).long()
            media = ((ids == cfg.image_token_id) | (ids == cfg.video_token_id)).numpy()
            edges = np.flatnonzero(np.diff(np.concatenate([[0], media.astype(np.int8), [0]])))
            runs = list(zip(edges[0::2].tolist(), edges[1::2].tolist()))  # [start, end) of each item
            positions = mrope_positions.clone()
            cursor = num_computed_tokens
            cleaned = []
            for emb in multimodal_embeddings:
                rel = emb[:, -4:-1].long().T.to(positions.device)
                start, end = next((s, e) for s, e in runs if e > cursor)
                first = max(cursor, start)
                if first + rel.shape[1] > end:
                    raise RuntimeError(f"{rel.shape[1]} embeddings from token {first} overrun the "
                                       f"media placeholders [{start}, {end})")
                # The token before a media item is its <|vision_start|>: text, id final.
                base = positions[0, start - 1] + 1 if start > 0 else 0
                positions[:, first:first + rel.shape[1]] = rel + base
                cursor = first + rel.shape[1]
                cleaned.append(emb[:, :-4])
            last = len(ids) - 1
            # Qwen prompts close every media item with <|vision_end|>, so the last token is text.
            end_id = positions[0, last] if not media[last] else positions.max()
            delta = int(end_id) + 1 - len(ids)
        return cleaned, positions, delta

    # -- the embedding step --------------------------------------------------------------------
    def _vtk_tower(self, pixel_values: Tensor, grid: List[List[int]]):
        """(merger outputs [units, D] in raster order, q, k [patches, C] of the score block in the
        tower's window order, all heads)."""
        attn = self._vtk_attn
        got: Dict[str, Tensor] = {}

        def take_qk(_m, args, kwargs):
            # Qwen2_5_VisionAttention calls its encoder attention with query=, key= after the
            # rotary: [1, patches, local heads, head_dim].
            got["q"], got["k"] = kwargs["query"], kwargs["key"]

        with hooked(attn.attn, take_qk, pre=True):
            embeds = self.visual(pixel_values, grid_thw=grid)
        need(got, ("q", "k"), "the score block's encoder attention")
        q, k = (t.reshape(t.shape[1], -1) for t in (got["q"], got["k"]))
        return embeds, all_heads(q, attn.tp_size), all_heads(k, attn.tp_size)

    def vtk_select(self, pixel_values: Tensor, grid: List[List[int]]):
        """Per image: (kept merger outputs [m, D], kept raster positions [m] in the merged grid,
        ascending), m = min(keep, units)."""
        o = self.vtk_options
        vis = self.visual
        m = vis.spatial_merge_size
        unit = vis.spatial_merge_unit
        embeds, q, k = self._vtk_tower(pixel_values, grid)
        sizes = [t * h * w for t, h, w in grid]
        for (t, _, _) in grid:
            if t != 1:
                raise ValueError(f"an image has {t} temporal patches; images have 1")
        cu = torch.tensor([0] + sizes, device=q.device).cumsum(0)
        # Patches of each image attend only to their own image in full-attention blocks.
        scores = ops.attention_received_varlen(q, k, cu, vis.num_heads)
        out, start_p, start_u = [], 0, 0
        for (t, h, w), n in zip(grid, sizes):
            units = n // unit
            # Window order keeps each merge unit's 4 patches together: one score per unit.
            s_win = scores[start_p:start_p + n].view(units, unit).mean(1)
            window_index = vis.get_rope_by_thw(t, h, w)[2].to(s_win.device)
            s = torch.empty_like(s_win)
            s[window_index] = s_win  # window slot j holds raster unit window_index[j]
            x = embeds[start_u:start_u + units]  # the merger's outputs, raster order
            keep = min(o.keep, units)
            if o.method == "vispruner":
                idx = ops.vispruner_select(x[None], s[None], keep, o.important_ratio, o.dedup_step)
                tokens = ops.gather_tokens(x[None], idx)
            else:
                strategy = "rank" if o.method == "fopru_rank" else "row"
                tokens, idx = ops.fopru_select(x[None], s[None], keep, strategy, w // m)
            out.append((tokens[0], idx[0]))
            start_p += n
            start_u += units
        return out

    def _process_image_input(self, image_input) -> tuple:
        if image_input["type"] == "image_embeds":
            raise ValueError(f"{ARCH} prunes inside the vision tower; precomputed image_embeds "
                             "cannot be pruned (serve them with Qwen2_5_VLForConditionalGeneration)")
        grid = image_input["image_grid_thw"].tolist()
        m = self.visual.spatial_merge_size
        with torch.no_grad():
            selected = self.vtk_select(image_input["pixel_values"], grid)
        out = []
        for (tokens, idx), (_, h, w) in zip(selected, grid):
            gh, gw = h // m, w // m
            # The 4 channels EVS hands to recompute_mrope_positions: t, row, col of each kept
            # unit, and the extent after which the text resumes. vLLM puts the image's width
            # there; max(rows, cols) is the unpruned sequence's resume point (the same when the
            # grid is not taller than wide), so text keeps its unpruned ids.
            pos = torch.stack([torch.zeros_like(idx), idx // gw, idx % gw,
                               torch.full_like(idx, max(gh, gw))], dim=1)
            out.append(torch.cat([tokens, pos.to(tokens.dtype)], dim=1))
        return tuple(out)

    def _postprocess_image_embeds_evs(self, image_embeds_split, image_input):
        # _process_image_input already appended each kept unit's own position channels.
        return image_embeds_split
