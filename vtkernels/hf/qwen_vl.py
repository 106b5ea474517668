"""Qwen2.5-VL, Qwen3-VL and Qwen3.5 (``Qwen2_5_VLForConditionalGeneration``,
``Qwen3VLForConditionalGeneration``, ``Qwen3_5ForConditionalGeneration``).

Towers without CLS (ALGORITHMS.md, "Towers without CLS"). The images of a call are packed along
one sequence (``cu_seqlens``); the LLM sees one token per merge unit (2 x 2 patches fused by the
merger), in raster order of the image's merged grid (h/2 x w/2). What pruning does here:

- The whole tower runs (the merger's output of the last block is the features). The score block
  is the last full-attention block (Qwen2.5-VL: ``fullatt_block_indexes[-1]``; Qwen3-VL and
  Qwen3.5: the last block). Its fused ``qkv`` output and its rotary embeddings are captured
  while the block runs (``capture.packed_block_qkv``); q and k are rotated afterwards with the
  module's own rotary function, so no projection and no attention runs twice.
- Patch scores: ``attention_received_varlen`` over the image segments; a merge unit's score is
  the mean of its patches' scores. Qwen2.5-VL's window attention permutes the merge units inside
  the blocks; the permutation it used (``window_index``) maps the scores back to raster order,
  exactly as the model maps the merger's output back.
- Methods on merge units, per image: FoPru rank / row (merged grid, width w/2), VisPruner
  (duplicate removal on the merger outputs), PruMerge / PruMerge+ (keys: the score block's k
  before rotary, averaged per unit; the merged tokens in raster order of their centres, then the
  summary token). ``keep`` is a per-image budget: an image with at most ``keep`` units keeps all.
- Positions (M-RoPE): computed by the model's own ``get_rope_index`` on the unpruned sequence;
  every kept token keeps its (t, row, col) ids, text keeps its ids; PruMerge's summary token
  takes the ids of the image's last merge unit. ``generate`` gets the compacted prompt with
  those position ids (plus the text row it builds itself: attended-token counts), so decoding
  continues at each row's last position + 1 -- the unpruned sequence's last position + 1, since
  Qwen prompts end in text (``<|vision_end|>`` closes every image). The model's ``rope_deltas``
  are set to agree, for callers that decode by hand with the cache.
- Qwen3-VL's deepstack features (added to the first LLM layers at the visual positions) are
  pruned with the same indices (PruMerge: the centres'; the summary token gets zeros) and handed
  to the language model for the prefill.
- Videos (``pixel_values_videos``) are not pruned: their features come from the model's own
  ``get_video_features`` and go to their placeholders unchanged (Qwen3-VL: their deepstack
  features too), next to the pruned images of the same call. A call with videos and no images is
  the model's own.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from torch import Tensor, nn

from .. import ops
from . import methods
from .base import Adapter, Parts, Plan, Prepared
from .capture import packed_block_qkv, rotary_of, window_index_of
from .llava import pad_token_id
from .sequence import compact, text_positions


@dataclass
class QwenParts(Parts):
    family: str = ""  # "qwen2_5_vl", "qwen3_vl", "qwen3_5"
    visual: Optional[nn.Module] = None
    language_model: Optional[nn.Module] = None
    score_block: int = 0
    merge: int = 2  # spatial_merge_size: a merge unit is merge x merge patches
    windowed: bool = False  # Qwen2.5-VL: window attention permutes the merge units
    deepstack: bool = False  # Qwen3-VL: deepstack features go to the first LLM layers
    video_token_id: Optional[int] = None
    rotary: Optional[Callable] = None


_FAMILY = {"Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
           "Qwen3VLForConditionalGeneration": "qwen3_vl",
           "Qwen3_5ForConditionalGeneration": "qwen3_5"}


class QwenVLAdapter(Adapter):
    classes = tuple(_FAMILY)
    unit = "merge units (LLM tokens) per image"

    def __init__(self, model):
        super().__init__(model)
        family = _FAMILY[type(model).__name__]
        inner = model.model
        visual = getattr(inner, "visual", None)
        blocks = getattr(visual, "blocks", None)
        if not isinstance(blocks, nn.ModuleList) or not len(blocks) or not all(
                isinstance(getattr(getattr(b, "attn", None), "qkv", None), nn.Linear) for b in blocks):
            raise ValueError(f"{type(model).__name__}: expected a vision tower of blocks with a fused "
                             "attn.qkv projection (this transformers version is not supported)")
        vcfg = model.config.vision_config
        windowed = family == "qwen2_5_vl"
        if windowed:
            full = list(getattr(vcfg, "fullatt_block_indexes", None) or [])
            if not full or not all(0 <= i < len(blocks) for i in full):
                raise ValueError(f"fullatt_block_indexes={full} must name full-attention blocks of the "
                                 f"{len(blocks)}-block tower")
            score_block = full[-1]
            if not hasattr(visual, "permute_input_for_window_attn"):
                raise ValueError("this transformers version's Qwen2.5-VL tower has no "
                                 "permute_input_for_window_attn (window order): not supported")
        else:
            score_block = len(blocks) - 1
        for name in ("get_rope_index", "get_video_features"):
            if not callable(getattr(inner, name, None)):
                raise ValueError(f"{type(inner).__name__} has no {name}: this transformers version is not supported")
        deep = list(getattr(visual, "deepstack_visual_indexes", None) or [])
        cfg = model.config
        self.parts = QwenParts(
            layers=blocks, num_heads=vcfg.num_heads, embed=model.get_input_embeddings(),
            image_token_id=cfg.image_token_id, pad_id=pad_token_id(model), family=family, visual=visual,
            language_model=inner.language_model, score_block=score_block, merge=vcfg.spatial_merge_size,
            windowed=windowed, deepstack=bool(deep), video_token_id=getattr(cfg, "video_token_id", None),
            rotary=rotary_of(blocks[score_block].attn))

    def validate(self, plan: Plan) -> None:
        if plan.merges and not plan.per_sample:
            # The pooled count needs one N for the whole batch; Qwen's images differ in size.
            raise ValueError("per_sample=False pools PruMerge's quartiles over a batch of equal-size "
                             "images; Qwen packs images of different sizes: use per_sample=True")

    # ------------------------------------------------------------------ vision side

    def _tower(self, pixel_values: Tensor, grid: Tensor, want_keys: bool):
        """Runs the whole tower once; returns (merged [U, D] raster, deepstack [U, D] list,
        unit scores [U] raster, unit keys [U, C] raster or None)."""
        p = self.parts
        got: dict = {}
        with contextlib.ExitStack() as stack:
            stack.enter_context(packed_block_qkv(p.layers[p.score_block].attn, got))
            if p.windowed:
                stack.enter_context(window_index_of(p.visual, got))
            out = p.visual(pixel_values.type(p.visual.dtype), grid_thw=grid)
        if "qkv" not in got or (p.windowed and "window_index" not in got):
            raise RuntimeError("the vision tower did not run the block pruning reads")
        merged = out.pooler_output
        deep = list(getattr(out, "deepstack_features", None) or []) if p.deepstack else []
        qkv = got["qkv"]
        S = qkv.shape[0]
        H = p.num_heads
        C = qkv.shape[1] // 3
        q, k, _ = qkv.view(S, 3, H, C // H).unbind(1)  # as the block splits it: [S, H, head_dim]
        qr, kr = p.rotary(q, k, got["cos"], got["sin"])
        scores = ops.attention_received_varlen(qr.reshape(S, C), kr.reshape(S, C), got["cu_seqlens"], H)
        u = p.merge * p.merge
        if S % u:
            raise ValueError(f"{S} patches do not form whole {p.merge}x{p.merge} merge units")
        # Each merge unit's patches are consecutive inside the tower (the processor's order; the
        # window permutation moves whole units).
        unit_scores = scores.view(S // u, u).mean(dim=1)
        keys = k.reshape(S // u, u, C).mean(dim=1) if want_keys else None
        if p.windowed:
            back = torch.argsort(got["window_index"].to(unit_scores.device))
            unit_scores = unit_scores[back]
            keys = keys[back] if keys is not None else None
        return merged, deep, unit_scores, keys

    def _select(self, plan: Plan, pixel_values: Tensor, grid: Tensor):
        """Per image: (tokens [m, D], deepstack [L_ds][m, D], ordinals [m] into its placeholders,
        kept positions [k] ascending); and the unit counts."""
        p = self.parts
        if grid is None:
            raise ValueError("pruning needs image_grid_thw (the processor returns it)")
        thw = grid.tolist()
        for t, h, w in thw:
            if t != 1:
                raise ValueError(f"image_grid_thw has t={t}: an image is one temporal patch (videos go in "
                                 "pixel_values_videos)")
            if h % p.merge or w % p.merge:
                raise ValueError(f"image grid {h}x{w} is not a whole number of {p.merge}x{p.merge} merge units")
        dims = [(h // p.merge, w // p.merge) for _, h, w in thw]
        counts = [gh * gw for gh, gw in dims]
        merged, deep, scores, keys = self._tower(pixel_values, grid, plan.merges)
        if merged.shape[0] != sum(counts):
            raise RuntimeError(f"the merger returned {merged.shape[0]} tokens for {sum(counts)} merge units")
        offsets = [0]
        for n in counts:
            offsets.append(offsets[-1] + n)
        result: List = [None] * len(counts)
        groups: dict = {}
        for i, d in enumerate(dims):
            groups.setdefault(d, []).append(i)
        for (gh, gw), members in groups.items():
            n = gh * gw
            rows = torch.cat([torch.arange(offsets[i], offsets[i] + n) for i in members]).to(merged.device)
            xs = merged[rows].view(len(members), n, -1)
            ss = scores[rows.to(scores.device)].view(len(members), n)
            ds = [d[rows.to(d.device)].view(len(members), n, -1) for d in deep]
            if plan.merges:
                ks = keys[rows.to(keys.device)].view(len(members), n, -1)
                tokens, lengths = methods.merge(plan, xs, ks, ss)
                counts_ref = methods.merge_counts(ss, plan.per_sample)
                for j, i in enumerate(members):
                    m = lengths[j]
                    centres = methods.merge_centres(ss[j], m, plan.plus, counts_ref[j])
                    order = torch.argsort(centres)
                    sorted_c = centres[order]
                    # Merged tokens in raster order of their centres, then the summary token, which
                    # takes the place (and ids) of the image's last merge unit.
                    tok = torch.cat([tokens[j, :m - 1][order.to(tokens.device)], tokens[j, m - 1:m]])
                    dev = sorted_c.to(xs.device)
                    deep_j = [torch.cat([d[j, dev], d.new_zeros(1, d.shape[-1])]) for d in ds]
                    ordinals = torch.cat([sorted_c, torch.tensor([n - 1])])
                    result[i] = (tok, deep_j, ordinals, sorted_c)
                continue
            keep = min(plan.keep, n)
            tokens, idx = methods.select_fixed(plan, xs, ss, keep, gw)
            for j, i in enumerate(members):
                deep_j = [ops.gather_tokens(d[j:j + 1], idx[j:j + 1])[0] for d in ds]
                result[i] = (tokens[j], deep_j, idx[j].cpu(), idx[j])
        return result, counts

    # ------------------------------------------------------------------ sequence side

    def prepare(self, plan: Plan, input_ids: Tensor, call: dict, generating: bool) -> Prepared:
        p = self.parts
        model = self.model
        inner = model.model
        pixel_values = call.pop("pixel_values")
        grid = call.pop("image_grid_thw", None)
        videos = call.pop("pixel_values_videos", None)
        vgrid = call.pop("video_grid_thw", None)
        seconds = call.pop("second_per_grid_ts", None)
        mm = call.pop("mm_token_type_ids", None)
        mask = call.pop("attention_mask", None)
        labels = call.pop("labels", None)
        if videos is not None and vgrid is None:
            raise ValueError("pixel_values_videos needs video_grid_thw (the processor returns it)")
        # The selection is not differentiable; nothing in the tower gets a gradient under pruning.
        with torch.no_grad():
            images, counts = self._select(plan, pixel_values, grid)
        if mm is None:  # as the processor makes them: 0 text, 1 image, 2 video
            mm = (input_ids == p.image_token_id).long()
            if p.video_token_id is not None:
                mm = mm + 2 * (input_ids == p.video_token_id).long()
        rope_kwargs = dict(mm_token_type_ids=mm, image_grid_thw=grid, video_grid_thw=vgrid, attention_mask=mask)
        if seconds is not None:
            rope_kwargs["second_per_grid_ts"] = seconds
        # M-RoPE ids of the unpruned sequence, as the model computes them.
        pos, _ = inner.get_rope_index(input_ids, **rope_kwargs)
        attended = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
        last = pos.masked_fill(~attended.to(pos.device)[None], -1).amax(dim=(0, 2))  # [B]
        c = compact(input_ids, p.image_token_id, counts, [o for _, _, o, _ in images], p.pad_id,
                    mask, labels, extras={"pos": pos})
        pos_c = c.extras["pos"]
        embeds = p.embed(c.ids)
        feats = torch.cat([t for t, _, _, _ in images]).to(embeds.device, embeds.dtype)
        embeds = embeds.masked_scatter(c.image[..., None].to(embeds.device), feats)
        video_mask = None
        video_deep: List[Tensor] = []
        if videos is not None:
            video_mask = c.ids == p.video_token_id
            out = inner.get_video_features(videos, vgrid, return_dict=True)
            v = _cat(out.pooler_output).to(embeds.device, embeds.dtype)
            if int(video_mask.sum()) != v.shape[0]:
                raise ValueError(f"input_ids hold {int(video_mask.sum())} video tokens but the videos give "
                                 f"{v.shape[0]}")
            embeds = embeds.masked_scatter(video_mask[..., None].to(embeds.device), v)
            if p.deepstack:
                video_deep = [_cat(f) for f in out.deepstack_features]
        context = contextlib.nullcontext()
        if p.deepstack:
            context = self._deepstack(c.image, [torch.cat([d[l] for _, d, _, _ in images])
                                                for l in range(len(images[0][1]))],
                                      video_mask, video_deep, c.ids.shape[1])
        valid = c.ids.new_full((c.ids.shape[0],), c.ids.shape[1]) if c.mask is None else c.mask.long().sum(1)
        # For decoding from the cache by hand (the model's own fallback): next = last + 1.
        inner.rope_deltas = (last.to(valid.device) + 1 - valid)[:, None]
        if generating:
            text = text_positions(c.mask, *c.ids.shape, c.ids.device)
            kwargs = {"input_ids": c.ids, "inputs_embeds": embeds,
                      # [4, B, L]: the text row generate builds for its masks, then M-RoPE's three.
                      "position_ids": torch.cat([text[None].to(pos_c.device), pos_c], dim=0)}
            if c.mask is not None:
                kwargs["attention_mask"] = c.mask
        else:
            kwargs = {"inputs_embeds": embeds, "attention_mask": c.mask, "position_ids": pos_c,
                      "labels": c.labels}
        kept = [[functools.partial(_cpu, k)] for _, _, _, k in images]
        return Prepared(kwargs=kwargs, prompt_ids=c.ids, lengths=[t.shape[0] for t, _, _, _ in images],
                        kept=kept, projected=counts, context=context)

    def _deepstack(self, image_mask: Tensor, image_deep: List[Tensor], video_mask: Optional[Tensor],
                   video_deep: List[Tensor], prompt_len: int):
        """Hands the language model's prefill the deepstack features at the visual positions
        (the model only adds them when it computed the features itself)."""
        visual = image_mask if video_mask is None else image_mask | video_mask
        joint = []
        for l, img in enumerate(image_deep):
            e = img.new_zeros(int(visual.sum()), img.shape[-1])
            e[image_mask[visual].to(e.device)] = img
            if video_mask is not None:
                e[video_mask[visual].to(e.device)] = video_deep[l].to(e.dtype)
            joint.append(e)
        return _inject_prefill(self.parts.language_model, visual, joint, prompt_len)


def _cpu(t: Tensor) -> Tensor:
    return t.cpu()


def _cat(x) -> Tensor:
    return torch.cat(list(x), dim=0) if isinstance(x, (tuple, list)) else x


@contextlib.contextmanager
def _inject_prefill(lm: nn.Module, visual: Tensor, embeds: List[Tensor], prompt_len: int):
    state = {"done": False}

    def pre(_m, args, kwargs):
        if state["done"]:
            return None
        x = kwargs.get("inputs_embeds")
        if x is None or x.shape[1] != prompt_len:
            raise RuntimeError("the language model's first call under pruning was not the prefill of the "
                               f"compacted prompt ({prompt_len} tokens): deepstack features cannot be placed")
        state["done"] = True
        mask, feats = visual, embeds
        if x.shape[0] != mask.shape[0]:  # beams / num_return_sequences: each row repeated r times
            r = x.shape[0] // mask.shape[0]
            per_row = mask.sum(1).tolist()
            mask = mask.repeat_interleave(r, dim=0)
            feats = [torch.cat([c for c in f.split(per_row) for _ in range(r)]) for f in feats]
        kwargs["visual_pos_masks"] = mask.to(x.device)
        kwargs["deepstack_visual_embeds"] = [f.to(x.device, x.dtype) for f in feats]
        return args, kwargs

    handle = lm.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
