"""Visual-token pruning for Hugging Face LLaVA models.

    import vtkernels.hf as vhf
    handle = vhf.apply_pruning(model, method="vispruner", keep=64)
    out = model.generate(**inputs)      # inputs straight from the processor
    handle.remove()

``apply_pruning`` puts two instance attributes on the model, ``forward`` and ``generate``; the
class and every weight stay as they were, and ``remove()`` deletes the two attributes again.
When a call carries ``pixel_values``, the wrapper

1. runs the vision tower only as far as the method needs, with forward hooks on ``q_proj`` and
   ``k_proj`` of the layer the method reads (ALGORITHMS.md): the tower keeps its own attention
   kernel (SDPA, flash) and no attention map is ever formed or requested;
2. scores and selects with the vtk ops, per crop, then projects only the tokens it keeps;
3. drops the pruned image placeholders from ``input_ids``, ``attention_mask`` and ``labels``,
   left-pads the rows back to one length, re-indexes positions (compact, as in the published
   LLaVA code), and calls the model's own ``forward``/``generate`` with the embeddings.

``generate`` then returns the caller's ``input_ids`` followed by the new tokens, as it does
without pruning; ``forward`` returns logits over the compacted sequence.

LLaVA-NeXT: every crop (the base image and each grid crop) is pruned independently to the same
``keep``. Candidates in a grid crop are only its tokens that survive the unpadding to the
image's aspect ratio (``image_sizes``), so padding never uses the budget; the kept tokens are laid
out as LLaVA-NeXT lays out all of them (rows of the unpadded grid) and every image-newline token
is kept. PruMerge's merged tokens have no grid position: each grid crop's merged tokens come in
crop order, followed by one newline token.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import ops, reference

__all__ = ["METHODS", "PruningHandle", "apply_pruning", "pruning"]

# method -> (accepted options with their defaults); None = required
METHODS: Dict[str, Dict[str, object]] = {
    "fopru_rank": {"keep": None},
    "fopru_row": {"keep": None},
    "vispruner": {"keep": None, "important_ratio": 0.5, "dedup_step": 8},
    "prumerge": {"knn": 32, "per_sample": True},
    "prumerge_plus": {"knn": 32, "per_sample": True},
}

_OP_OF = {"vispruner": "vispruner_select", "prumerge": "prumerge", "prumerge_plus": "prumerge"}


class _StopVision(Exception):
    """Raised from a forward hook once the vision tower has produced everything we read."""


@dataclass
class _Plan:
    method: str
    keep: int = 0
    important_ratio: float = 0.5
    dedup_step: int = 8
    knn: int = 32
    per_sample: bool = True

    @property
    def merges(self) -> bool:
        return self.method.startswith("prumerge")


@dataclass
class _Parts:
    """The pieces of a LLaVA model that pruning touches, found once at apply time."""
    next: bool  # LLaVA-NeXT (anyres crops, image newline)
    layers: nn.ModuleList  # vision encoder layers
    num_heads: int
    grid: int  # patches per side of one crop
    projector: nn.Module
    embed: nn.Module
    image_token_id: int
    pad_id: int
    newline: Optional[Tensor] = None
    grid_pinpoints: Optional[list] = None
    crop_size: int = 0


@dataclass
class _ImageLayout:
    """Where the kept tokens of one image go, and how many placeholders the processor made."""
    placeholders: int  # tokens the unpruned model puts in the sequence for this image
    crops: List[int] = field(default_factory=list)  # indices into the flattened crop batch
    grid_ids: Optional[Tensor] = None  # NeXT: [h', w'] crop-major token ids of the unpadded grid


# --------------------------------------------------------------------------- model inspection

def _supported_classes():
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
    return LlavaForConditionalGeneration, LlavaNextForConditionalGeneration


def _find(module: nn.Module, path: str):
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def _inspect(model) -> _Parts:
    llava, llava_next = _supported_classes()
    # Exact classes: subclasses (video variants, other families) lay their inputs out differently.
    if type(model) not in (llava, llava_next):
        raise ValueError(
            f"vtkernels.hf supports LlavaForConditionalGeneration and LlavaNextForConditionalGeneration, "
            f"got {type(model).__name__}")
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
    grid = vcfg.image_size // vcfg.patch_size
    pad = None
    for src in (getattr(model, "generation_config", None), cfg.text_config, cfg):
        p = getattr(src, "pad_token_id", None) if src is not None else None
        if isinstance(p, int):
            pad = p
            break
    parts = _Parts(
        next=type(model) is llava_next, layers=layers, num_heads=vcfg.num_attention_heads, grid=grid,
        projector=inner.multi_modal_projector, embed=model.get_input_embeddings(),
        image_token_id=cfg.image_token_id, pad_id=0 if pad is None else pad,
        crop_size=vcfg.image_size)
    if parts.next:
        parts.newline = inner.image_newline
        parts.grid_pinpoints = cfg.image_grid_pinpoints
    return parts


def _feature_layer(parts: _Parts, vision_feature_layer) -> int:
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


# --------------------------------------------------------------------------- options

def _plan(method: str, options: dict, parts: _Parts) -> _Plan:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    accepted = METHODS[method]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"method {method!r} takes options {sorted(accepted)}, got unknown {unknown}")
    values = {k: options.get(k, d) for k, d in accepted.items()}
    N = parts.grid * parts.grid
    if "keep" in values:
        keep = values["keep"]
        if keep is None:
            raise ValueError(f"method {method!r} needs keep= (visual tokens kept per image, 1..{N})")
        if isinstance(keep, bool) or not isinstance(keep, int):
            raise ValueError(f"keep must be an int, got {keep!r}")
        if not 1 <= keep <= N:
            raise ValueError(f"keep={keep} must be in [1, {N}]: each image (crop) has {N} visual tokens")
    if "important_ratio" in values:
        r = values["important_ratio"]
        if not isinstance(r, (int, float)) or not 0.0 <= float(r) <= 1.0:
            raise ValueError(f"important_ratio must be in [0, 1], got {r!r}")
        values["important_ratio"] = float(r)
    for name in ("dedup_step", "knn"):
        if name in values:
            v = values[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if "per_sample" in values and not isinstance(values["per_sample"], bool):
        raise ValueError(f"per_sample must be a bool, got {values['per_sample']!r}")
    op = _OP_OF.get(method)
    if op is not None and not hasattr(ops, op):
        raise NotImplementedError(f"method {method!r} needs vtkernels.ops.{op}, which this build lacks")
    return _Plan(method=method, **values)


# --------------------------------------------------------------------------- vision side

def _output(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _run_vision(model, parts: _Parts, pixel_values: Tensor, feature_layer: int, qk_layer: int):
    """Features [P, T, C] (output of ``feature_layer``) and q, k [P, T, C] of ``qk_layer``.

    The tower stops after the last layer whose output something reads. When ``qk_layer`` lies one
    past it (PruMerge reads the last layer's q/k, LLaVA's features come from the one before), only
    that layer's layer_norm1, q_proj and k_proj run: its attention and MLP would be wasted.
    """
    layers = parts.layers
    stop_at = max(feature_layer, qk_layer - 1)
    got: dict = {}
    qk = layers[qk_layer].self_attn

    def keep_q(_m, _a, out):
        got["q"] = out

    def keep_k(_m, _a, out):
        got["k"] = out

    def keep_layer(idx):
        def hook(_m, _a, out):
            got[idx] = _output(out)
            if idx == stop_at:
                raise _StopVision
        return hook

    handles = [qk.q_proj.register_forward_hook(keep_q), qk.k_proj.register_forward_hook(keep_k)]
    for idx in sorted({feature_layer, stop_at}):
        handles.append(layers[idx].register_forward_hook(keep_layer(idx)))
    try:
        try:
            model.model.vision_tower(pixel_values)
        except _StopVision:
            pass
        if "q" not in got:  # qk_layer = stop_at + 1: its projections only
            h = layers[qk_layer].layer_norm1(got[stop_at])
            qk.q_proj(h)
            qk.k_proj(h)
    finally:
        for h in handles:
            h.remove()
    if feature_layer not in got or "q" not in got or "k" not in got:
        raise RuntimeError("the vision tower did not run the layers pruning reads")
    return got[feature_layer], got["q"], got["k"]


def _group_rects(rects: List[Tuple[int, int, int, int]]):
    groups: Dict[tuple, List[int]] = {}
    for i, r in enumerate(rects):
        groups.setdefault(r, []).append(i)
    return groups


def _prumerge_centres(scores: Tensor, length: int, plus: bool) -> Tensor:
    """Positions of the tokens PruMerge kept (the merge centres), for pictures of the selection.

    The op returns merged tokens only. The centres follow from its length (kept + 1 summary): the
    best ``kept`` by score, or for PruMerge+ the best k plus the spatial samples that k implies.
    """
    n = scores.shape[0]
    order = reference.rank_order(scores[None])[0].tolist()
    kept = length - 1
    if plus:
        for k in range(1, kept + 1):
            extra = reference.prumerge_samples(n, k, order[:k])
            if k + len(extra) == kept:
                return torch.tensor(sorted(order[:k] + extra), dtype=torch.long)
    return torch.tensor(sorted(order[:kept]), dtype=torch.long)


def _positions_at(pos: Tensor, idx: Tensor) -> Tensor:
    return pos[idx.cpu()]


def _merge_centres_at(pos: Tensor, scores: Tensor, length: int, plus: bool) -> Tensor:
    return pos[_prumerge_centres(scores.float().cpu(), length, plus)]


def _select(plan: _Plan, parts: _Parts, x: Tensor, q: Tensor, k: Tensor,
            rects: List[Tuple[int, int, int, int]]):
    """Scores every crop, then selects per group of crops that share a candidate rectangle.

    rects[i] = (row0, row1, col0, col1): the part of crop i's grid that may be kept. Returns
    [(crops, tokens [g, M, C] in sequence order, lengths, kept-position thunks)] per group. The
    positions are only materialised on request: the Python side of that (and the host sync) is
    for pictures and the NeXT layout, not for every forward.
    """
    G = parts.grid
    if plan.merges:
        # PruMerge: CLS row of a single-head attention over all channels of the last layer.
        scores = ops.cls_attention(q, k, 1)
    elif plan.method == "vispruner":
        scores = ops.cls_attention(q, k, parts.num_heads)
    else:
        scores = ops.fopru_significance(q, k, parts.num_heads)
    keys = k[:, 1:]
    plus = plan.method == "prumerge_plus"
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
            tokens, lengths = ops.prumerge(xs, pick(keys), ss, plan.knn, plus, plan.per_sample)
            lengths = lengths.tolist()
            fns = [functools.partial(_merge_centres_at, pos, ss[j], m, plus) for j, m in enumerate(lengths)]
            groups.append((crops, tokens, lengths, fns))
            continue
        keep = min(plan.keep, pos.numel())
        if plan.method == "vispruner":
            idx = ops.vispruner_select(xs, ss, keep, plan.important_ratio, plan.dedup_step)
            tokens = ops.gather_tokens(xs, idx)
        else:
            strategy = "rank" if plan.method == "fopru_rank" else "row"
            tokens, idx = ops.fopru_select(xs, ss, keep, strategy, c1 - c0)
        fns = [functools.partial(_positions_at, pos, idx[j]) for j in range(g)]
        groups.append((crops, tokens, [keep] * g, fns))
    return groups


def _layouts(parts: _Parts, pixel_values: Tensor, image_sizes) -> Tuple[Tensor, List[_ImageLayout], list]:
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


def _assemble_next(parts: _Parts, lay: _ImageLayout, projected: List[Tensor], kept: List,
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


def _image_features(model, parts: _Parts, plan: _Plan, pixel_values: Tensor, image_sizes,
                    vision_feature_layer, select_strategy):
    """Per image: pruned, projected tokens; placeholder count; kept-position thunks per crop;
    tokens that went through the projector (newline tokens are not projected)."""
    if select_strategy != "default":
        raise ValueError(f"pruning needs vision_feature_select_strategy='default' (CLS dropped), "
                         f"got {select_strategy!r}")
    feature_layer = _feature_layer(parts, vision_feature_layer)
    qk_layer = len(parts.layers) - 1 if plan.merges else feature_layer
    crops, layouts, rects = _layouts(parts, pixel_values, image_sizes)
    # The selection is not differentiable; the projector (applied below) keeps its gradient.
    with torch.no_grad():
        feats, q, k = _run_vision(model, parts, crops, feature_layer, qk_layer)
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


# --------------------------------------------------------------------------- sequence side

def _compact(parts: _Parts, input_ids: Tensor, attention_mask, labels, images: List[Tensor],
             placeholders: List[int]):
    """Drops the pruned placeholders; returns (ids, mask, labels, embeds, position_ids)."""
    B, L = input_ids.shape
    is_img = input_ids == parts.image_token_id
    total = int(is_img.sum())
    if total != sum(placeholders):
        raise ValueError(f"input_ids hold {total} image tokens but the images need {sum(placeholders)} "
                         "(one image per <image> placeholder run, as the processor makes them)")
    device = input_ids.device
    slot = is_img.reshape(-1).nonzero().squeeze(1)  # placeholders, in the order images fill them
    ordinal = torch.cat([torch.arange(n, device=device) for n in placeholders])
    kept_n = torch.tensor([t.shape[0] for t in images], device=device).repeat_interleave(
        torch.tensor(placeholders, device=device))
    # Each image keeps the first m of its placeholders; which ones does not matter, positions
    # are re-indexed below.
    keep = torch.ones(B * L, dtype=torch.bool, device=device)
    keep[slot[ordinal >= kept_n]] = False
    keep = keep.view(B, L)
    lens = keep.sum(1)
    Lc = int(lens.max())
    # Right-align every row: extra padding goes on the left, where generate expects it.
    dest = (keep.cumsum(1) - 1) + (Lc - lens)[:, None]
    rows = torch.arange(B, device=device)[:, None].expand(B, L)[keep]
    cols = dest[keep]
    ids = torch.full((B, Lc), parts.pad_id, dtype=input_ids.dtype, device=device)
    ids[rows, cols] = input_ids[keep]
    img = torch.zeros((B, Lc), dtype=torch.bool, device=device)
    img[rows, cols] = is_img[keep]
    padded = bool((lens != Lc).any())
    mask = None
    if attention_mask is not None or padded:
        mask = torch.zeros((B, Lc), dtype=torch.long if attention_mask is None else attention_mask.dtype,
                           device=device)
        mask[rows, cols] = 1 if attention_mask is None else attention_mask[keep]
    new_labels = None
    if labels is not None:
        new_labels = torch.full((B, Lc), -100, dtype=labels.dtype, device=labels.device)
        new_labels[rows, cols] = labels[keep]
    embeds = parts.embed(ids)
    feats = torch.cat(images, dim=0).to(embeds.device, embeds.dtype)
    embeds = embeds.masked_scatter(img[..., None].to(embeds.device), feats)
    position_ids = None
    if mask is not None:
        # As generate builds them: count only attended tokens; padding gets 0 (never attended).
        position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return ids, mask, new_labels, embeds, position_ids


# --------------------------------------------------------------------------- the handle

_MISSING = object()


def _bind(sig: inspect.Signature, args, kwargs) -> dict:
    """The call's arguments by name, the **kwargs part merged in, defaults left out."""
    bound = sig.bind_partial(*args, **kwargs).arguments
    for name, p in sig.parameters.items():
        if p.kind is p.VAR_KEYWORD:
            bound.update(bound.pop(name, {}) or {})
        elif p.kind is p.VAR_POSITIONAL and bound.pop(name, ()):
            raise TypeError(f"unexpected positional arguments for {name}")
    return bound


def _shift_lengths(model, call: dict, prompt_len: int, compact_len: int) -> None:
    """Keeps the number of new tokens of ``generate`` under pruning.

    ``max_length`` and ``min_length`` count the prompt, which pruning shortens: where they decide
    the length (no ``max_new_tokens`` / ``min_new_tokens``), they are shifted by the tokens pruned,
    whether they come from a keyword, the passed ``generation_config`` or
    ``model.generation_config`` (same precedence as transformers). The transformers default
    (``max_length`` 20 new tokens, capped by ``max_position_embeddings``) is kept as unpruned.
    Edits ``call`` only: a passed config is copied, ``model.generation_config`` is left alone.
    """
    shift = compact_len - prompt_len
    if shift == 0:
        return
    gc = call.get("generation_config")
    model_gc = getattr(model, "generation_config", None)

    def effective(name):
        for src in (call, vars(gc) if gc is not None else None, vars(model_gc) if model_gc is not None else None):
            if src is not None and src.get(name) is not None:
                return src[name]
        return None

    updates = {}
    if effective("max_new_tokens") is None:
        max_length = effective("max_length")
        if max_length is None:  # transformers: `default` new tokens, at most max_position_embeddings in all
            default = 20
            defaults = getattr(type(model_gc), "_get_default_generation_params", None) if model_gc is not None else None
            if defaults is not None:
                default = defaults().get("max_length", default) or default
            cap = getattr(model.config, "max_position_embeddings", None)
            if cap is not None and prompt_len + default > cap:
                max_length = cap
        if max_length is not None:
            updates["max_length"] = max_length + shift
    if effective("min_new_tokens") is None:
        min_length = effective("min_length")
        if min_length:
            updates["min_length"] = max(min_length + shift, 0)
    for name, value in updates.items():
        if call.get(name) is not None or gc is None:
            call[name] = value
        else:
            if call.get("generation_config") is gc:
                gc = call["generation_config"] = copy.deepcopy(gc)
            setattr(gc, name, value)


class PruningHandle:
    """What ``apply_pruning`` returns: ``remove()`` puts the model back; also a context manager.

    After each pruned call: ``last_lengths`` = visual tokens per image in the sequence (newline
    tokens included), ``last_kept`` = kept patch positions per image and per crop (raster positions
    in the crop's grid; PruMerge: the merge centres), ``last_projected`` = tokens per image that
    went through the projector.
    """

    def __init__(self, model, parts: _Parts, plan: _Plan, options: dict):
        self.model = model
        self.method = plan.method
        self.options = dict(options)
        self._kept_fns: list = []
        self._kept: Optional[List[List[Tensor]]] = None
        self.last_lengths: List[int] = []
        self.last_projected: List[int] = []
        self._parts = parts
        self._plan = plan
        self._saved = {name: model.__dict__.get(name, _MISSING) for name in ("forward", "generate")}
        self._active = False

    @property
    def last_kept(self) -> List[List[Tensor]]:
        if self._kept is None:
            self._kept = [[fn() for fn in crops] for crops in self._kept_fns]
        return self._kept

    # -- the pruned path, shared by forward and generate
    def _prepare(self, input_ids, pixel_values, attention_mask, labels, image_sizes,
                 vision_feature_layer, select_strategy):
        cfg = self.model.config
        layer = cfg.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = cfg.vision_feature_select_strategy if select_strategy is None else select_strategy
        images, placeholders, kept, projected = _image_features(
            self.model, self._parts, self._plan, pixel_values, image_sizes, layer, strategy)
        self._kept_fns, self._kept = kept, None
        self.last_lengths = [t.shape[0] for t in images]
        self.last_projected = projected
        return _compact(self._parts, input_ids, attention_mask, labels, images, placeholders)

    def _install(self):
        model = self.model
        orig_forward = model.forward
        orig_generate = model.generate
        fsig = inspect.signature(orig_forward)

        @functools.wraps(orig_forward)
        def forward(*args, **kwargs):
            bound = _bind(fsig, args, kwargs)
            if bound.get("pixel_values") is None:
                return orig_forward(*args, **kwargs)
            input_ids = bound.pop("input_ids", None)
            if input_ids is None:
                raise ValueError("pruning needs input_ids to find the image placeholders")
            if bound.pop("inputs_embeds", None) is not None:
                raise ValueError("pass input_ids, not inputs_embeds, with pixel_values under pruning")
            pixel_values = bound.pop("pixel_values")
            # Positions are re-indexed over the compacted sequence; caller's positions refer to
            # the placeholders that are gone.
            bound.pop("position_ids", None)
            bound.pop("cache_position", None)
            ids, mask, labels, embeds, pos = self._prepare(
                input_ids, pixel_values, bound.pop("attention_mask", None), bound.pop("labels", None),
                bound.pop("image_sizes", None), bound.pop("vision_feature_layer", None),
                bound.pop("vision_feature_select_strategy", None))
            return orig_forward(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                                labels=labels, **bound)

        gsig = inspect.signature(orig_generate)

        @functools.wraps(orig_generate)
        def generate(*args, **kwargs):
            call = _bind(gsig, args, kwargs)
            input_ids = call.pop("input_ids", None)
            inputs = call.pop("inputs", None)
            input_ids = inputs if input_ids is None else input_ids
            if call.get("pixel_values") is None or input_ids is None:
                return orig_generate(*args, **kwargs)
            if call.pop("inputs_embeds", None) is not None:
                raise ValueError("pass input_ids, not inputs_embeds, with pixel_values under pruning")
            call.pop("labels", None)
            call.pop("position_ids", None)
            ids, mask, _, embeds, _ = self._prepare(
                input_ids, call.pop("pixel_values"), call.pop("attention_mask", None), None,
                call.pop("image_sizes", None), call.pop("vision_feature_layer", None),
                call.pop("vision_feature_select_strategy", None))
            _shift_lengths(model, call, input_ids.shape[1], ids.shape[1])
            if mask is not None:
                call["attention_mask"] = mask
            out = orig_generate(input_ids=ids, inputs_embeds=embeds, **call)
            seq = out if isinstance(out, Tensor) else out.sequences
            prompt = input_ids.to(seq.device)
            if seq.shape[0] != prompt.shape[0]:  # beams / num_return_sequences: rows per prompt
                prompt = prompt.repeat_interleave(seq.shape[0] // prompt.shape[0], dim=0)
            full = torch.cat([prompt, seq[:, ids.shape[1]:]], dim=1)
            if isinstance(out, Tensor):
                return full
            out.sequences = full
            return out

        model.forward = forward
        model.generate = generate
        self._active = True

    def remove(self) -> None:
        """Gives the model back exactly as it was (idempotent)."""
        if not self._active:
            return
        for name, saved in self._saved.items():
            if saved is _MISSING:
                model_dict = self.model.__dict__
                model_dict.pop(name, None)
            else:
                setattr(self.model, name, saved)
        if getattr(self.model, "_vtk_pruning", None) is self:
            del self.model._vtk_pruning
        self._active = False

    def __enter__(self) -> "PruningHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"PruningHandle({self.method}{', ' + opts if opts else ''}, active={self._active})"


def apply_pruning(model, method: str, **options) -> PruningHandle:
    """Prunes the visual tokens of a LLaVA or LLaVA-NeXT model on every call with images.

    method: "fopru_rank", "fopru_row" (option ``keep``), "vispruner" (``keep``,
    ``important_ratio=0.5``, ``dedup_step=8``), "prumerge", "prumerge_plus" (adaptive count;
    ``knn=32``, ``per_sample=True``). ``keep`` counts visual tokens per image, per crop on
    LLaVA-NeXT. Raises ValueError for another model class, an unknown method or option, or a
    ``keep`` outside [1, tokens per image].
    """
    parts = _inspect(model)
    plan = _plan(method, options, parts)
    current = getattr(model, "_vtk_pruning", None)
    if current is not None and current._active:
        raise ValueError(f"model is already pruned ({current!r}); call remove() first")
    _feature_layer(parts, model.config.vision_feature_layer)
    strategy = model.config.vision_feature_select_strategy
    if strategy != "default":
        raise ValueError(f"pruning needs vision_feature_select_strategy='default' (CLS dropped), got {strategy!r}")
    handle = PruningHandle(model, parts, plan, options)
    handle._install()
    model._vtk_pruning = handle
    return handle


@contextlib.contextmanager
def pruning(model, method: str, **options):
    """``with pruning(model, method="fopru_row", keep=144): ...`` -- pruned inside, original after."""
    handle = apply_pruning(model, method, **options)
    try:
        yield handle
    finally:
        handle.remove()
