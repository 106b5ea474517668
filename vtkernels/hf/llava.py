"""LLaVA-1.5 (``LlavaForConditionalGeneration``) and LLaVA-NeXT (``LlavaNextForConditionalGeneration``).

CLIP tower with CLS (token 0); features of ``vision_feature_layer`` (patches only) go through the
projector. The tower runs only as far as the method reads (``capture.run_cls_tower``); only the
kept tokens are projected; the pruned placeholders leave the sequence and positions are
re-indexed (compact), as in the published LLaVA code.

LLaVA-NeXT: every crop (the base image and each grid crop) is pruned independently to the same
``keep``. Candidates in a grid crop are only its tokens that survive the unpadding to the
image's aspect ratio (``image_sizes``), so padding never uses the budget; the kept tokens are laid
out as LLaVA-NeXT lays out all of them (rows of the unpadded grid) and every image-newline token
is kept. PruMerge's merged tokens have no grid position: each grid crop's merged tokens come in
crop order, followed by one newline token.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import methods
from .base import Adapter, Parts, Plan, Prepared
from .capture import run_cls_tower
from .sequence import compact, text_positions


@dataclass
class LlavaParts(Parts):
    next: bool = False  # LLaVA-NeXT (anyres crops, image newline)
    grid: int = 0  # patches per side of one crop
    projector: Optional[nn.Module] = None
    tower: Optional[nn.Module] = None
    newline: Optional[Tensor] = None
    grid_pinpoints: Optional[list] = None
    crop_size: int = 0


@dataclass
class _ImageLayout:
    """Where the kept tokens of one image go, and how many placeholders the processor made."""
    placeholders: int  # tokens the unpruned model puts in the sequence for this image
    crops: List[int] = field(default_factory=list)  # indices into the flattened crop batch
    grid_ids: Optional[Tensor] = None  # NeXT: [h', w'] crop-major token ids of the unpadded grid


def _find(module: nn.Module, path: str):
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def pad_token_id(model) -> int:
    cfg = model.config
    for src in (getattr(model, "generation_config", None), getattr(cfg, "text_config", None), cfg):
        p = getattr(src, "pad_token_id", None) if src is not None else None
        if isinstance(p, int):
            return p
    return 0


class LlavaAdapter(Adapter):
    classes = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
    unit = "visual tokens per image (per crop on LLaVA-NeXT)"

    def __init__(self, model):
        super().__init__(model)
        cfg = model.config
        inner = model.model
        tower = inner.vision_tower
        layers = _find(tower, "vision_model.encoder.layers") or _find(tower, "encoder.layers")
        if not isinstance(layers, nn.ModuleList) or not all(
                _find(l, "self_attn.q_proj") is not None and _find(l, "self_attn.k_proj") is not None
                and _find(l, "layer_norm1") is not None for l in layers):
            raise ValueError(f"vision tower {type(tower).__name__} is not a CLIP-style encoder "
                             "(layers with layer_norm1 and self_attn.q_proj/k_proj)")
        vcfg = cfg.vision_config
        if getattr(vcfg, "model_type", "") not in ("clip_vision_model",):
            # The scores need token 0 to be CLS (CLS row, patch-only grids).
            raise ValueError(f"pruning needs a CLIP vision tower (token 0 = CLS), got {vcfg.model_type!r}")
        is_next = type(model).__name__ == "LlavaNextForConditionalGeneration"
        self.parts = LlavaParts(
            layers=layers, num_heads=vcfg.num_attention_heads, embed=model.get_input_embeddings(),
            image_token_id=cfg.image_token_id, pad_id=pad_token_id(model), next=is_next,
            grid=vcfg.image_size // vcfg.patch_size, projector=inner.multi_modal_projector, tower=tower,
            crop_size=vcfg.image_size)
        if is_next:
            self.parts.newline = inner.image_newline
            self.parts.grid_pinpoints = cfg.image_grid_pinpoints

    def max_keep(self) -> int:
        return self.parts.grid * self.parts.grid

    def validate(self, plan: Plan) -> None:
        cfg = self.model.config
        feature_layer(self.parts, cfg.vision_feature_layer)
        strategy = cfg.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(f"pruning needs vision_feature_select_strategy='default' (CLS dropped), got {strategy!r}")

    def prepare(self, plan: Plan, input_ids: Tensor, call: dict, generating: bool) -> Prepared:
        cfg = self.model.config
        layer = call.pop("vision_feature_layer", None)
        strategy = call.pop("vision_feature_select_strategy", None)
        layer = cfg.vision_feature_layer if layer is None else layer
        strategy = cfg.vision_feature_select_strategy if strategy is None else strategy
        images, placeholders, kept, projected = image_features(
            self.parts, plan, call.pop("pixel_values"), call.pop("image_sizes", None), layer, strategy)
        labels = call.pop("labels", None)
        # Each image keeps the first m of its placeholders; which ones does not matter, positions
        # are re-indexed below.
        ordinals = [torch.arange(t.shape[0]) for t in images]
        c = compact(input_ids, self.parts.image_token_id, placeholders, ordinals, self.parts.pad_id,
                    call.pop("attention_mask", None), labels)
        embeds = self.parts.embed(c.ids)
        feats = torch.cat(images, dim=0).to(embeds.device, embeds.dtype)
        embeds = embeds.masked_scatter(c.image[..., None].to(embeds.device), feats)
        if generating:
            kwargs = {"input_ids": c.ids, "inputs_embeds": embeds}
            if c.mask is not None:
                kwargs["attention_mask"] = c.mask
        else:
            pos = None if c.mask is None else text_positions(c.mask, *c.ids.shape, c.ids.device)
            kwargs = {"inputs_embeds": embeds, "attention_mask": c.mask, "position_ids": pos,
                      "labels": c.labels}
        return Prepared(kwargs=kwargs, prompt_ids=c.ids, lengths=[t.shape[0] for t in images],
                        kept=kept, projected=projected)


def feature_layer(parts: LlavaParts, vision_feature_layer) -> int:
    if not isinstance(vision_feature_layer, int):
        raise ValueError("pruning needs a single vision_feature_layer (an int), "
                         f"got {vision_feature_layer!r}")
    L = len(parts.layers)
    idx = vision_feature_layer if vision_feature_layer >= 0 else L + 1 + vision_feature_layer
    # hidden_states[i] is the output of layer i - 1 (hidden_states[0] is the embedding).
    if not 1 <= idx <= L:
        raise ValueError(f"vision_feature_layer={vision_feature_layer} must select the output of an "
                         f"encoder layer (the tower has {L})")
    return idx - 1


# --------------------------------------------------------------------------- vision side

def _group_rects(rects: List[Tuple[int, int, int, int]]):
    groups: Dict[tuple, List[int]] = {}
    for i, r in enumerate(rects):
        groups.setdefault(r, []).append(i)
    return groups


def _positions_at(pos: Tensor, idx: Tensor) -> Tensor:
    return pos[idx.cpu()]


def _merge_centres_at(pos: Tensor, scores: Tensor, length: int, plus: bool) -> Tensor:
    return pos[methods.merge_centres(scores, length, plus).sort().values]


def _select(plan: Plan, parts: LlavaParts, x: Tensor, q: Tensor, k: Tensor,
            rects: List[Tuple[int, int, int, int]]):
    """Scores every crop, then selects per group of crops that share a candidate rectangle.

    rects[i] = (row0, row1, col0, col1): the part of crop i's grid that may be kept. Returns
    [(crops, tokens [g, M, C] in sequence order, lengths, kept-position thunks)] per group.
    """
    G = parts.grid
    scores = methods.cls_tower_scores(plan, q, k, parts.num_heads)
    keys = k[:, 1:]
    groups = []
    for (r0, r1, c0, c1), crops in _group_rects(rects).items():
        g = len(crops)
        if r1 <= r0 or c1 <= c0:  # a crop made only of padding keeps nothing
            empty = torch.zeros(0, dtype=torch.long)
            groups.append((crops, x.new_zeros((g, 0, x.shape[2])), [0] * g, [lambda: empty] * g))
            continue
        pos = (torch.arange(r0, r1)[:, None] * G + torch.arange(c0, c1)[None, :]).reshape(-1)
        whole = pos.numel() == G * G
        sel = torch.tensor(crops, device=x.device)
        pos_d = pos.to(x.device)
        pick = (lambda t: t[sel]) if whole else (lambda t: t[sel][:, pos_d])
        xs, ss = pick(x), pick(scores)
        if plan.merges:
            tokens, lengths = methods.merge(plan, xs, pick(keys), ss)
            fns = [functools.partial(_merge_centres_at, pos, ss[j], m, plan.plus) for j, m in enumerate(lengths)]
            groups.append((crops, tokens, lengths, fns))
            continue
        keep = min(plan.keep, pos.numel())
        tokens, idx = methods.select_fixed(plan, xs, ss, keep, c1 - c0)
        fns = [functools.partial(_positions_at, pos, idx[j]) for j in range(g)]
        groups.append((crops, tokens, [keep] * g, fns))
    return groups


def _layouts(parts: LlavaParts, pixel_values: Tensor, image_sizes) -> Tuple[Tensor, List[_ImageLayout], list]:
    """Flattens the crops of every image and says where each image's tokens go."""
    N = parts.grid * parts.grid
    if not parts.next:
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be [images, 3, H, W], got {tuple(pixel_values.shape)}")
        n = pixel_values.shape[0]
        full = (0, parts.grid, 0, parts.grid)
        return pixel_values, [_ImageLayout(placeholders=N, crops=[i]) for i in range(n)], [full] * n
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape, image_size_to_num_patches, unpad_image)
    if image_sizes is None:
        raise ValueError("LLaVA-NeXT needs image_sizes (the processor returns them)")
    sizes = image_sizes.tolist() if isinstance(image_sizes, Tensor) else [list(s) for s in image_sizes]
    counts = [image_size_to_num_patches(image_size=s, grid_pinpoints=parts.grid_pinpoints,
                                        patch_size=parts.crop_size) for s in sizes]
    if pixel_values.dim() == 5:
        crops = torch.cat([pv[:c] for pv, c in zip(pixel_values, counts)], dim=0)
    elif pixel_values.dim() == 4:
        crops = pixel_values
    else:
        raise ValueError(f"pixel_values must have 4 or 5 dimensions, got {tuple(pixel_values.shape)}")
    G = parts.grid
    layouts, rects, start = [], [], 0
    for s, c in zip(sizes, counts):
        lay = _ImageLayout(placeholders=0, crops=list(range(start, start + c)))
        rects.append((0, G, 0, G))  # the base image: whole grid
        if c == 1:
            lay.placeholders = N + 1
        else:
            nph, npw = get_anyres_image_grid_shape(s, parts.grid_pinpoints, parts.crop_size)
            # Token ids (crop-major: (crop - 1) * N + position) pushed through LLaVA-NeXT's own
            # reshape and unpad, so the layout matches the unpruned model's for every version.
            ids = torch.arange((c - 1) * N).view(nph, npw, G, G, 1).permute(4, 0, 2, 1, 3)
            ids = unpad_image(ids.flatten(1, 2).flatten(2, 3), s)[0]
            lay.grid_ids = ids
            lay.placeholders = N + ids.shape[0] * (ids.shape[1] + 1)
            for g in range(c - 1):
                local = ids[(ids // N) == g] % N
                if local.numel() == 0:
                    rects.append((0, 0, 0, 0))
                else:
                    rows, cols = local // G, local % G
                    rects.append((int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1))
        layouts.append(lay)
        start += c
    return crops, layouts, rects


def _assemble_next(parts: LlavaParts, lay: _ImageLayout, projected: List[Tensor], kept: List,
                   merges: bool) -> Tensor:
    """One LLaVA-NeXT image: base crop, then the grid crops laid out with their newline tokens."""
    nl = parts.newline.to(projected[0].dtype)[None]
    base = projected[0]
    if lay.grid_ids is None:
        return torch.cat([base, nl], dim=0)
    N = parts.grid * parts.grid
    if merges:
        pieces = [base]
        for t in projected[1:]:
            if t.shape[0]:
                pieces += [t, nl]
        return torch.cat(pieces, dim=0)
    ids = lay.grid_ids
    h, w = ids.shape
    # Sort key of each token: its place in the row-major walk of the unpadded grid, where every
    # row ends with a newline slot (key row * (w + 1) + w).
    where = torch.full(((len(projected) - 1) * N,), -1, dtype=torch.long)
    where[ids.reshape(-1)] = torch.arange(h * w)
    keys, tokens = [], []
    for g in range(len(projected) - 1):
        flat = where[g * N + kept[g + 1]()]
        keys.append(flat // w * (w + 1) + flat % w)
        tokens.append(projected[g + 1])
    keys.append(torch.arange(h) * (w + 1) + w)
    tokens.append(nl.expand(h, -1))
    order = torch.cat(keys).argsort().to(base.device)
    return torch.cat([base, torch.cat(tokens, dim=0)[order]], dim=0)


def image_features(parts: LlavaParts, plan: Plan, pixel_values: Tensor, image_sizes,
                   vision_feature_layer, select_strategy):
    """Per image: pruned, projected tokens; placeholder count; kept-position thunks per crop;
    tokens that went through the projector (newline tokens are not projected)."""
    if select_strategy != "default":
        raise ValueError(f"pruning needs vision_feature_select_strategy='default' (CLS dropped), "
                         f"got {select_strategy!r}")
    f_layer = feature_layer(parts, vision_feature_layer)
    qk_layer = len(parts.layers) - 1 if plan.merges else f_layer
    crops, layouts, rects = _layouts(parts, pixel_values, image_sizes)
    # The selection is not differentiable; the projector (applied below) keeps its gradient.
    with torch.no_grad():
        feats, q, k = run_cls_tower(parts.tower, parts.layers, crops, f_layer, qk_layer)
        groups = _select(plan, parts, feats[:, 1:], q, k, rects)
    per_crop: List = [None] * crops.shape[0]
    for members, tokens, lengths, fns in groups:
        projected = parts.projector(tokens)  # one call per group: only the kept tokens
        for j, i in enumerate(members):
            per_crop[i] = (projected[j, :lengths[j]], fns[j])
    images, kept, n_projected = [], [], []
    for lay in layouts:
        proj = [per_crop[i][0] for i in lay.crops]
        fns = [per_crop[i][1] for i in lay.crops]
        n_projected.append(sum(t.shape[0] for t in proj))
        images.append(_assemble_next(parts, lay, proj, fns, plan.merges) if parts.next else proj[0])
        kept.append(fns)
    return images, [lay.placeholders for lay in layouts], kept, n_projected
