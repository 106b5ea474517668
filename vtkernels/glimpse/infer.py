"""GlimpsePrune inference inside the language model, for LLaVA-1.5 and Qwen2.5-VL (ALGORITHMS.md
"GlimpsePrune").

    from vtkernels.glimpse import GlimpseHead, apply_glimpse
    handle = apply_glimpse(model, "path/to/checkpoint")   # or a GlimpseHead
    out = model.generate(**inputs, max_new_tokens=32)      # inputs straight from the processor
    handle.remove()

``apply_glimpse`` puts two instance attributes on the model, ``forward`` and ``generate``; the
class and the weights stay as they were. A call with ``pixel_values`` runs the pruned prefill:

1. the vision tower runs once, with forward hooks that keep the outputs of the condition layers
   (LLaVA: CLIP hidden states, patches only; the tower stops after the deepest layer read.
   Qwen2.5-VL: the outputs of vision blocks 31, 23, 15, 7, averaged per merge unit and mapped from
   the window order to raster order, ``qwen.run_tower``); the projector (merger) makes the image
   tokens;
2. the glimpse token (input g(0)) is appended after the whole prompt at position last + 1 (Qwen:
   all three M-RoPE rows; the M-RoPE ids come from the model's ``get_rope_index``), and
   layers 0..K run on the full sequence with the model's own decoder layers, attention kernel and
   cache, g(l) added to the glimpse's hidden state before layer l >= 1;
3. the glimpse's query row of layer K (its q_proj output, captured by a hook, rotated here with
   the layer's cos/sin) against layer K's cached keys gives one [Hq, T + 1] row per sample
   (``vtkernels.ops.glimpse_logits``; LLaVA: log-softmax over the attended keys; Qwen: the raw
   logits); its image columns and the conditions go through the VIP, per image on its token grid
   (Qwen: images of one grid size together); the keep rule decides on the device;
4. the glimpse and the pruned image tokens leave: the hidden states and the keys and values of
   layers 0..K are gathered to the kept tokens with ONE ``vtkernels.ops.gather_cache`` call
   (index [B, M], -1 = left padding), the only host wait being the one that reads M;
5. layers K+1.. run on the shortened sequence with the original position ids (Qwen: each kept
   token its (t, row, col) ids).

``forward`` returns logits over the kept sequence (left-padded in a padded batch) and the pruned
cache. ``generate`` is the model's own: its prefill is the call above, and the cache it gets back
carries what the decoding steps need (the pruned prefix's attention mask and the position after
the last original one). The forward wrapper then rewrites each decoding step's inputs: the
attention mask generate keeps (over the caller's prompt) gets the pruned prefix's mask in place of
the prompt's columns, and new tokens take positions last original position + 1, + 2, ... (Qwen:
in all three rows; the model's ``rope_deltas`` are set to agree, for callers that decode by hand).
So
``generate`` keeps all its options, and returns the caller's ``input_ids`` then the new tokens.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor, nn

from .. import ops
from .. import reference
from ..hf.handle import ModelWrapper, bind_call
from .head import GlimpseHead, check_options
from . import qwen as _qwen
from .qwen import check_decoder

__all__ = ["GlimpseHandle", "apply_glimpse", "keep_mask"]


class _StopVision(Exception):
    """Raised from a forward hook once the vision tower has produced every layer we read."""


def keep_mask(logits: Tensor, threshold: float = 0.5, min_keep: int = 1,
              max_ratio: Optional[float] = None) -> Tensor:
    """GlimpsePrune's keep rule (ALGORITHMS.md step 4) per image: bool [n, N].

    Keeps the tokens with sigmoid(logit) > threshold; if more than ``max_ratio * N`` pass, the top
    int(max_ratio * N) instead; if fewer than ``min_keep``, the top min_keep. Ranking is by the
    logit, ties (and equal sigmoids) at the lower position first, NaN last. Runs on the device
    without a host wait: sigmoid is monotone, so the thresholded set is a prefix of the ranking
    and every case reduces to "the best c tokens" for a per-image count c.
    """
    check_options(threshold, min_keep, max_ratio)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [images, N], got {tuple(logits.shape)}")
    n, N = logits.shape
    s = logits.float()
    count = (torch.sigmoid(s) > threshold).sum(1)
    if max_ratio is not None:
        count = count.clamp_max(int(max_ratio * N))
    count = count.clamp_min(min(min_keep, N))
    order = reference.rank_order(s)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(N, device=s.device).expand(n, N))
    return rank < count[:, None]


def _output(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


@dataclass
class _Parts:
    """The pieces of a LLaVA-1.5 model the glimpse prefill runs, found once at apply time."""
    lm: nn.Module  # the LLM (LlamaModel): rotary_emb, norm, config
    layers: nn.ModuleList  # its decoder layers
    cache_kw: str  # the decoder layers' name for the cache ("cache" or, before 5.24, "past_key_values")
    embed: nn.Module
    tower: nn.Module
    tower_layers: nn.ModuleList
    projector: nn.Module
    lm_head: nn.Module
    image_token_id: int
    grid: int  # patches per side
    feature_layer: int  # hidden_states index of LLaVA's image features
    num_heads: int  # LLM query heads


def _inspect(model) -> _Parts:
    from transformers import LlavaForConditionalGeneration
    if type(model) is not LlavaForConditionalGeneration:
        # Exact class: LLaVA-NeXT and other subclasses lay their image tokens out differently.
        raise ValueError("GlimpsePrune inference supports LlavaForConditionalGeneration (LLaVA-1.5), "
                         f"got {type(model).__name__}")
    cfg = model.config
    if getattr(cfg.vision_config, "model_type", "") != "clip_vision_model":
        raise ValueError(f"GlimpsePrune on LLaVA needs a CLIP vision tower, got {cfg.vision_config.model_type!r}")
    if cfg.vision_feature_select_strategy != "default":
        raise ValueError("GlimpsePrune needs vision_feature_select_strategy='default' (CLS dropped: the VIP "
                         f"works on the patch grid), got {cfg.vision_feature_select_strategy!r}")
    inner = model.model
    tower = inner.vision_tower
    tlayers = getattr(getattr(tower, "vision_model", tower), "encoder").layers
    depth = len(tlayers)
    f = cfg.vision_feature_layer
    if isinstance(f, bool) or not isinstance(f, int) or not -depth - 1 <= f <= depth:
        raise ValueError(f"GlimpsePrune needs a single int vision_feature_layer, got {f!r}")
    lm = inner.language_model
    layers = lm.layers
    cache_kw = check_decoder(lm)
    vc = cfg.vision_config
    return _Parts(lm=lm, layers=layers, cache_kw=cache_kw, embed=model.get_input_embeddings(), tower=tower,
                  tower_layers=tlayers, projector=inner.multi_modal_projector, lm_head=model.lm_head,
                  image_token_id=cfg.image_token_id, grid=vc.image_size // vc.patch_size,
                  feature_layer=f % (depth + 1), num_heads=cfg.text_config.num_attention_heads)


@dataclass
class _DecodeState:
    """Put on the pruned cache: what a decoding step needs to find its mask and positions."""
    prompt_len: int  # T: the sequence length of the caller's prompt
    kept_len: int  # M: the pruned prefix in the cache
    mask: Tensor  # [B, M] attention mask of the pruned prefix
    next_pos: Tensor  # [B] last original position + 1


def _output_class():
    from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast
    fields = LlavaCausalLMOutputWithPast.__dataclass_fields__
    return LlavaCausalLMOutputWithPast, ("cache" if "cache" in fields else "past_key_values")


# --------------------------------------------------------------------------- model families
#
# What differs between LLaVA-1.5 and Qwen2.5-VL in the glimpse prefill: the arguments a call
# carries for its images, the vision side (features, conditions, grids), the position ids (one row,
# or M-RoPE's three), and the output class. Everything else (the layers, the glimpse row, the
# VIP, the keep rule, the gather, decoding) is GlimpseHandle's and shared.

class _Llava:
    """LLaVA-1.5: one square grid per image, CLIP hidden states as conditions, 1D positions."""

    family = "llava"
    rows = 1  # position rows

    def __init__(self, model):
        p = _inspect(model)
        self.model, self.parts = model, p
        self.lm, self.layers, self.cache_kw, self.embed = p.lm, p.layers, p.cache_kw, p.embed
        self.lm_head, self.image_token_id, self.num_heads = p.lm_head, p.image_token_id, p.num_heads

    def take_images(self, bound: dict) -> dict:
        """Pops the call's image arguments (checked); what ``vision`` and ``positions`` read."""
        cfg = self.model.config
        vfl = bound.pop("vision_feature_layer", None)
        vfs = bound.pop("vision_feature_select_strategy", None)
        if vfl is not None and vfl != cfg.vision_feature_layer:
            raise ValueError(f"GlimpsePrune uses the config's vision_feature_layer={cfg.vision_feature_layer}, "
                             f"got {vfl!r}")
        if vfs is not None and vfs != "default":
            raise ValueError(f"GlimpsePrune needs vision_feature_select_strategy='default', got {vfs!r}")
        bound.pop("image_sizes", None)  # LLaVA-1.5: every image is one square crop
        return {"pixel_values": bound.pop("pixel_values")}

    def vision(self, head: GlimpseHead, images: dict):
        """(image tokens [U, H], conditions [U, C] per VIP block, (rows, cols) per image)."""
        p = self.parts
        depth = len(p.tower_layers)
        conds = [i % (depth + 1) for i in head.selected_visual_layers]
        want = sorted({p.feature_layer, *conds})
        got = {}
        last = want[-1]

        def keep_input(_m, args):  # hidden_states[0]: the input of layer 0
            got[0] = _output(args)
            if last == 0:
                raise _StopVision

        def keep_output(idx):
            def hook(_m, _a, out):
                got[idx] = _output(out)
                if idx == last:
                    raise _StopVision
            return hook

        handles = []
        if 0 in want:
            handles.append(p.tower_layers[0].register_forward_pre_hook(keep_input))
        for idx in want:
            if idx > 0:
                handles.append(p.tower_layers[idx - 1].register_forward_hook(keep_output(idx)))
        try:
            try:
                p.tower(images["pixel_values"])
            except _StopVision:
                pass
        finally:
            for h in handles:
                h.remove()
        if any(i not in got for i in want):
            raise RuntimeError("the vision tower did not run the layers GlimpsePrune reads")
        feats = p.projector(got[p.feature_layer][:, 1:])
        n, N, H = feats.shape
        return (feats.reshape(n * N, H), [got[i][:, 1:].reshape(n * N, -1) for i in conds],
                [(p.grid, p.grid)] * n)

    def positions(self, input_ids: Tensor, mask: Tensor, position_ids: Optional[Tensor], images: dict) -> Tensor:
        B, T = input_ids.shape
        if position_ids is None:
            # As generate builds them: attended tokens count up from 0, padding gets 0. Without
            # padding this is Hugging Face's arange; with it, a row equals its sample alone.
            pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        else:
            pos = position_ids.to(input_ids.device).long()
            if pos.dim() != 2 or pos.shape[-1] != T:
                raise ValueError(f"position_ids must be [B, T], got {tuple(pos.shape)}")
            pos = pos.expand(B, T)
        return pos[None]

    def rotary(self, h: Tensor, pos: Tensor):
        return self.lm.rotary_emb(h, pos[0])

    def layer_positions(self, pos: Tensor) -> Optional[Tensor]:
        return pos[0]

    def output(self, loss, logits, cache):
        cls, field = _output_class()
        return cls(loss=loss, logits=logits, **{field: cache})

    def after_prefill(self, next_pos: Tensor, kept: Tensor) -> None:
        pass

    def decode_positions(self, bound: dict, st: _DecodeState, extra: int, q: int) -> None:
        if bound.get("position_ids") is None:
            bound["position_ids"] = (st.next_pos[:, None] + extra
                                     + torch.arange(q, device=st.next_pos.device)[None, :])


class _Qwen:
    """Qwen2.5-VL: one merged grid (h/2 x w/2) per image, sizes differ; vision-block outputs pooled
    per merge unit as conditions; M-RoPE ids [3, B, T]."""

    family = "qwen2_5_vl"
    rows = 3

    def __init__(self, model):
        p = _qwen.inspect_qwen(model)
        self.model, self.parts = model, p
        self.lm, self.layers, self.cache_kw, self.embed = p.lm, p.layers, p.cache_kw, p.embed
        self.lm_head, self.image_token_id, self.num_heads = p.lm_head, p.image_token_id, p.num_heads

    def take_images(self, bound: dict) -> dict:
        for name in ("pixel_values_videos", "video_grid_thw"):
            if bound.pop(name, None) is not None:
                raise ValueError(f"{name}: videos are not supported under GlimpsePrune (images only)")
        bound.pop("second_per_grid_ts", None)  # videos only
        bound.pop("rope_deltas", None)  # recomputed from the call
        bound.pop("cache_position", None)  # the prefill starts an empty cache
        grid = bound.pop("image_grid_thw", None)
        if grid is None:
            raise ValueError("Qwen2.5-VL images need image_grid_thw (the processor returns it)")
        return {"pixel_values": bound.pop("pixel_values"), "image_grid_thw": grid,
                "mm_token_type_ids": bound.pop("mm_token_type_ids", None)}

    def vision(self, head: GlimpseHead, images: dict):
        p = self.parts
        grid = images["image_grid_thw"]
        dims = _qwen.image_dims(grid, p.merge)
        feats, conds = _qwen.run_tower(p, images["pixel_values"], grid, head.selected_visual_layers)
        if feats.shape[0] != sum(r * c for r, c in dims):
            raise RuntimeError(f"the merger returned {feats.shape[0]} tokens for {sum(r * c for r, c in dims)} "
                               "merge units")
        return feats, conds, dims

    def positions(self, input_ids: Tensor, mask: Tensor, position_ids: Optional[Tensor], images: dict) -> Tensor:
        B, T = input_ids.shape
        if position_ids is not None:
            pos = position_ids.to(input_ids.device).long()
            if pos.dim() == 3 and pos.shape[0] == 4:  # generate's [text row, t, h, w]
                pos = pos[1:]
            if pos.dim() != 3 or pos.shape[0] != 3 or pos.shape[-1] != T:
                raise ValueError(f"position_ids must be M-RoPE ids [3, B, T] (or [4, B, T]), got {tuple(pos.shape)}")
            return pos.expand(3, B, T)
        # get_rope_index reads the placeholders on the host anyway; checked first for a clear error.
        grid = images["image_grid_thw"]
        need = int((grid[:, 1] * grid[:, 2]).sum()) // (self.parts.merge ** 2)
        have = int((input_ids == self.image_token_id).sum())
        if have != need:
            raise ValueError(f"input_ids hold {have} image tokens but the {grid.shape[0]} images need {need} "
                             "(one <|image_pad|> per merge unit)")
        return _qwen.rope_positions(self.parts, input_ids, mask, images["image_grid_thw"].to(input_ids.device),
                                         images["mm_token_type_ids"])

    def rotary(self, h: Tensor, pos: Tensor):
        return self.lm.rotary_emb(h, pos)

    def layer_positions(self, pos: Tensor) -> Optional[Tensor]:
        # The decoder layers read position_ids only for packed flash attention; the mask is given.
        return None

    def output(self, loss, logits, cache):
        import sys
        mod = sys.modules[type(self.model).__module__]
        cls = getattr(mod, "Qwen2_5_VLCausalLMOutputWithPast", None) or getattr(mod, "MultimodalCausalLMOutputWithPast")
        fields = cls.__dataclass_fields__
        kw = {("cache" if "cache" in fields else "past_key_values"): cache}
        if "rope_deltas" in fields:
            kw["rope_deltas"] = self.parts.inner.rope_deltas
        return cls(loss=loss, logits=logits, **kw)

    def after_prefill(self, next_pos: Tensor, kept: Tensor) -> None:
        # For decoding from the cache by hand (the model's own fallback): position = attended
        # tokens so far + rope_deltas = last original position + 1 for the first new token.
        self.parts.inner.rope_deltas = (next_pos - kept)[:, None]

    def decode_positions(self, bound: dict, st: _DecodeState, extra: int, q: int) -> None:
        # generate's positions count the caller's (unpruned) mask: replaced, in all three rows.
        bound.pop("mm_token_type_ids", None)
        pos = st.next_pos[:, None] + extra + torch.arange(q, device=st.next_pos.device)[None, :]
        bound["position_ids"] = pos[None].expand(3, *pos.shape)


def _family_of(model):
    from transformers import LlavaForConditionalGeneration
    try:
        from transformers import Qwen2_5_VLForConditionalGeneration
    except ImportError:  # pragma: no cover - every supported transformers has it
        Qwen2_5_VLForConditionalGeneration = None
    # Exact classes: LLaVA-NeXT and other subclasses lay their image tokens out differently.
    if type(model) is LlavaForConditionalGeneration:
        return _Llava(model)
    if Qwen2_5_VLForConditionalGeneration is not None and type(model) is Qwen2_5_VLForConditionalGeneration:
        return _Qwen(model)
    raise ValueError("GlimpsePrune inference supports LlavaForConditionalGeneration (LLaVA-1.5) and "
                     f"Qwen2_5_VLForConditionalGeneration, got {type(model).__name__}")


class GlimpseHandle(ModelWrapper):
    """What ``apply_glimpse`` returns: ``remove()`` puts the model back; also a context manager.

    After each pruned call: ``last_kept[i][0]`` = kept token positions of image i (raster in its
    grid: LLaVA the patch grid, Qwen the merged grid; ascending, int64; images in the order they
    fill the placeholders), ``last_lengths[i]`` = how many. Both are read from the device only
    when asked for.
    """

    method = "glimpse"

    def __init__(self, model, family, head: GlimpseHead, threshold: float, min_keep: int,
                 max_ratio: Optional[float]):
        self._remember(model)
        self.head = head
        self.threshold = threshold
        self.min_keep = min_keep
        self.max_ratio = max_ratio
        self.options = {"threshold": threshold, "min_keep": min_keep, "max_ratio": max_ratio}
        self._family = family
        self._keep: Optional[Tensor] = None  # [U] flat over the call's images
        self._sizes: List[int] = []  # tokens per image
        self._kept: Optional[List[List[Tensor]]] = None

    @property
    def _parts(self):
        return self._family.parts

    @property
    def last_kept(self) -> List[List[Tensor]]:
        if self._kept is None:
            if self._keep is None:
                return []
            keep = self._keep.cpu()
            self._kept = [[row.nonzero().squeeze(1)] for row in keep.split(self._sizes)]
        return self._kept

    @property
    def last_lengths(self) -> List[int]:
        return [int(k[0].numel()) for k in self.last_kept]

    # ------------------------------------------------------------------ the pruned prefill
    def _layer_kwargs(self, mask, pos, pe, cache):
        return {"attention_mask": mask, "position_ids": pos, "position_embeddings": pe,
                self._family.cache_kw: cache, "use_cache": cache is not None}

    def _causal_mask(self, h: Tensor, mask: Tensor, pos: Optional[Tensor]):
        from transformers.masking_utils import create_causal_mask
        # No cache: the key length is the 2D mask's. The mask is always given, so the positions
        # (with gaps after pruning) are never read as packed sequences.
        return create_causal_mask(self._family.lm.config, h, mask, None, pos)

    def _decide(self, A: Tensor, conds: List[Tensor], dims) -> Tensor:
        """The VIP and the keep rule per image: A [U, Hq] and conditions [U, C] over the call's
        images (in order), dims their grids (``GlimpseHead.predict_images``: images of one grid
        go through the VIP together). Returns keep [U] bool."""
        logits = self.head.predict_images(A, conds, dims)
        by_size: dict = {}
        for i, lg in enumerate(logits):
            by_size.setdefault(lg.numel(), []).append(i)
        keep: List[Optional[Tensor]] = [None] * len(logits)
        for members in by_size.values():  # one keep_mask per image size (LLaVA: one for the batch)
            k = keep_mask(torch.stack([logits[i] for i in members]), self.threshold, self.min_keep, self.max_ratio)
            for j, i in enumerate(members):
                keep[i] = k[j]
        return torch.cat(keep)

    def _prefill(self, input_ids: Tensor, images: dict, attention_mask: Optional[Tensor],
                 position_ids: Optional[Tensor], cache, use_cache: bool):
        """Returns (hidden [B, M, H] after the final norm, the pruned cache or None, the gather
        index [B, M] into the caller's sequence, -1 = left padding)."""
        from transformers import DynamicCache
        fam = self._family
        head = self.head
        K = head.reduce_layer
        B, T = input_ids.shape
        device = input_ids.device
        if cache is not None and (not isinstance(cache, DynamicCache) or cache.get_seq_length() != 0):
            raise ValueError("GlimpsePrune prunes the prompt into an empty DynamicCache; got "
                             f"{type(cache).__name__} holding {cache.get_seq_length()} tokens "
                             "(static caches and continuing a cache are not supported)")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        if mask.shape != (B, T):
            raise ValueError(f"attention_mask must be [B, T] = {(B, T)}, got {tuple(mask.shape)}")
        pos = fam.positions(input_ids, mask, position_ids, images)  # [R, B, T]

        feats, conds, dims = self._family.vision(head, images)
        U, H = feats.shape
        is_img = input_ids == fam.image_token_id
        if U > B * T:
            raise ValueError(f"the {len(dims)} images need {U} image tokens, more than input_ids hold ({B} x {T})")
        # The image placeholders in the order images fill them, without a host wait: a stable
        # sort puts them first. Their count is checked at the one host read below.
        img_flat = torch.sort((~is_img).reshape(-1).to(torch.int8), stable=True).indices[:U]
        emb = fam.embed(input_ids)
        emb = emb.reshape(B * T, H).index_put((img_flat,), feats.to(emb.device, emb.dtype)).reshape(B, T, H)

        # Stage 1: layers 0..K on prompt + glimpse, the glimpse at the last position + 1 (every row).
        g = head.glimpse_embeddings(emb.dtype).to(device)
        h = torch.cat([emb, g[0].expand(B, 1, H)], dim=1)
        mask1 = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        next_pos = pos.masked_fill(mask[None] == 0, 0).amax(dim=(0, 2)) + 1  # [B]
        pos1 = torch.cat([pos, next_pos[None, :, None].expand(pos.shape[0], B, 1)], dim=2)
        pe1 = fam.rotary(h, pos1)
        lpos1 = fam.layer_positions(pos1)
        causal1 = self._causal_mask(h, mask1, lpos1)
        full_cache = DynamicCache(config=fam.lm.config)
        got = {}
        hook = fam.layers[K].self_attn.q_proj.register_forward_hook(
            lambda _m, _a, out: got.__setitem__("q", out[:, -1].clone()))  # not a view: frees the full q
        try:
            for l in range(K + 1):
                if l > 0:
                    h = torch.cat([h[:, :-1], h[:, -1:] + g[l]], dim=1)
                h = _output(fam.layers[l](h, **self._layer_kwargs(causal1, lpos1, pe1, full_cache)))
        finally:
            hook.remove()

        # The glimpse row of layer K: its query after RoPE against the layer's cached keys.
        attn = fam.layers[K].self_attn
        D = attn.head_dim
        q = got["q"].reshape(B, fam.num_heads, D)
        cos, sin = pe1[0][:, -1, None, :], pe1[1][:, -1, None, :]
        q = q * cos + _rotate_half(q) * sin
        keys = full_cache.layers[K].keys
        with torch.no_grad():
            row = ops.glimpse_logits(q, keys, attn.scaling, mask1.bool(), not head.use_attention_logits)
            rows, cols = img_flat // T, img_flat % T
            A = row.transpose(1, 2)[rows, cols]  # [U, Hq]
            keep_img = self._decide(A, conds, dims)
            keep_tok = (mask != 0) & ~is_img
            keep_tok = keep_tok.reshape(-1).index_put(
                (img_flat,), keep_img & (mask.reshape(-1)[img_flat] != 0)).reshape(B, T)
            n_kept = keep_tok.sum(1)
            # The one host wait: the length of the shortened sequence (and the placeholder check).
            M, placeholders = torch.stack([n_kept.max(), is_img.sum()]).tolist()
        if placeholders != U:
            per = "one run of <image> placeholders per image" if fam.family == "llava" else \
                "one <|image_pad|> per merge unit"
            raise ValueError(f"input_ids hold {placeholders} image tokens but the {len(dims)} images need {U} ({per})")
        if M == 0:
            raise ValueError("GlimpsePrune kept no token of any row (min_keep=0 and no text)")
        self._keep, self._sizes, self._kept = keep_img, [r * c for r, c in dims], None
        # Kept positions ascending, right-aligned, -1 on the left: sorting (t if kept else -1) puts
        # each row's -1s first, so its last M entries are the left-padded index.
        ar = torch.arange(T, device=device).expand(B, T)
        index = torch.where(keep_tok, ar, torch.full_like(ar, -1)).sort(dim=1).values[:, T - M:]

        tensors = [h]
        if use_cache:
            tensors += [t for c in full_cache.layers[:K + 1] for t in (c.keys, c.values)]
        gathered = ops.gather_cache(tensors, index)
        del tensors, full_cache, keys  # the unpruned cache goes before layers K+1.. run
        h = gathered[0]
        valid = index >= 0
        mask2 = valid.to(mask.dtype)
        R = pos.shape[0]
        pos2 = pos.gather(2, index.clamp_min(0)[None].expand(R, B, M)).masked_fill(~valid[None], 0)
        target = None
        if use_cache:
            target = cache if cache is not None else DynamicCache(config=fam.lm.config)
            for l in range(K + 1):
                target.update(gathered[1 + 2 * l], gathered[2 + 2 * l], l)

        # Stage 2: layers K+1.. on the kept tokens, original positions.
        pe2 = fam.rotary(h, pos2)
        lpos2 = fam.layer_positions(pos2)
        causal2 = self._causal_mask(h, mask2, lpos2)
        for l in range(K + 1, len(fam.layers)):
            h = _output(fam.layers[l](h, **self._layer_kwargs(causal2, lpos2, pe2, target)))
        h = fam.lm.norm(h)
        fam.after_prefill(next_pos, n_kept)
        if target is not None:
            target._vtk_glimpse = _DecodeState(prompt_len=T, kept_len=M, mask=mask2, next_pos=next_pos)
        return h, target, index

    def _pruned_forward(self, bound: dict):
        model = self.model
        fam = self._family
        input_ids = bound.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("GlimpsePrune needs input_ids to find the image placeholders")
        if bound.pop("inputs_embeds", None) is not None:
            raise ValueError("pass input_ids, not inputs_embeds, with pixel_values under GlimpsePrune")
        for name in ("output_attentions", "output_hidden_states"):
            if bound.pop(name, None):
                raise ValueError(f"{name} is not supported under GlimpsePrune (the sequence changes length "
                                 "inside the language model)")
        if bound.pop("mm_encoder_outputs", None) is not None:
            raise ValueError("mm_encoder_outputs cannot be combined with GlimpsePrune (it reads the tower's layers)")
        images = fam.take_images(bound)
        cfg = model.config
        cache = bound.pop("cache", None)
        past = bound.pop("past_key_values", None)
        cache = past if cache is None else cache
        use_cache = bound.pop("use_cache", None)
        if use_cache is None:
            use_cache = getattr(cfg.text_config, "use_cache", True)
        labels = bound.pop("labels", None)
        logits_to_keep = bound.pop("logits_to_keep", 0)
        return_dict = bound.pop("return_dict", None)
        attention_mask = bound.pop("attention_mask", None)
        position_ids = bound.pop("position_ids", None)
        leftover = sorted(k for k, v in bound.items() if v is not None and v is not False)
        if leftover:
            raise ValueError(f"GlimpsePrune's forward does not take {leftover}")
        h, target, index = self._prefill(input_ids, images, attention_mask, position_ids, cache, bool(use_cache))
        if isinstance(logits_to_keep, int):
            hs = h[:, -logits_to_keep:] if logits_to_keep > 0 else h
        else:
            hs = h[:, logits_to_keep]
        logits = fam.lm_head(hs)
        loss = None
        if labels is not None:
            kept_labels = labels.to(index.device).gather(1, index.clamp_min(0)).masked_fill(index < 0, -100)
            loss = model.loss_function(logits=logits, labels=kept_labels,
                                       vocab_size=cfg.text_config.vocab_size)
        out = fam.output(loss, logits, target)
        return out if return_dict is not False else out.to_tuple()

    def _decode_inputs(self, bound: dict, cache, st: _DecodeState) -> dict:
        """A decoding step on the pruned cache: the caller's mask (over the original prompt) gets
        the pruned prefix's mask in place of the prompt's columns; positions continue after the
        last original one (LLaVA: unless given)."""
        ids = bound.get("input_ids")
        ref = ids if ids is not None else bound.get("inputs_embeds")
        if ref is None:
            return bound
        q = ref.shape[1]
        past = cache.get_seq_length()
        extra = past - st.kept_len  # tokens decoded since the prefill
        if extra < 0:
            raise ValueError(f"the pruned cache was cropped below its prompt ({past} < {st.kept_len} tokens)")
        B = st.mask.shape[0]
        if ref.shape[0] != B:
            raise ValueError(f"batch of {ref.shape[0]} rows on a pruned cache of {B}")
        am = bound.get("attention_mask")
        if am is None:
            am = torch.cat([st.mask, st.mask.new_ones(B, extra + q)], dim=1)
        elif am.dim() == 2 and am.shape[1] == st.prompt_len + extra + q:
            am = torch.cat([st.mask.to(am.device, am.dtype), am[:, st.prompt_len:]], dim=1)
        elif not (am.dim() == 2 and am.shape[1] == past + q):
            raise ValueError(f"attention_mask of shape {tuple(am.shape)} fits neither the caller's prompt "
                             f"({st.prompt_len} + {extra + q} tokens) nor the pruned cache ({past} + {q})")
        bound["attention_mask"] = am
        self._family.decode_positions(bound, st, extra, q)
        return bound

    # ------------------------------------------------------------------ install / remove
    def _install(self):
        model = self.model
        orig_forward = model.forward
        orig_generate = model.generate
        fsig = inspect.signature(orig_forward)

        @functools.wraps(orig_forward)
        def forward(*args, **kwargs):
            bound = bind_call(fsig, args, kwargs)
            if bound.get("pixel_values") is not None:
                return self._pruned_forward(bound)
            cache = bound.get("cache")
            cache = bound.get("past_key_values") if cache is None else cache
            st = getattr(cache, "_vtk_glimpse", None)
            if st is not None:
                return orig_forward(**self._decode_inputs(bound, cache, st))
            return orig_forward(*args, **kwargs)

        @functools.wraps(orig_generate)
        def generate(*args, **kwargs):
            gc = kwargs.get("generation_config") or getattr(model, "generation_config", None)
            use_cache = kwargs.get("use_cache", getattr(gc, "use_cache", True))
            if kwargs.get("pixel_values") is not None and use_cache is False:
                # Without a cache every step would prune again, the glimpse after the new tokens.
                raise ValueError("GlimpsePrune decodes on the pruned cache: generate(use_cache=False) "
                                 "is not supported")
            return orig_generate(*args, **kwargs)

        # transformers >= 5.2x: generate encodes the images up front (get_image_features ->
        # mm_encoder_outputs) and drops pixel_values when forward accepts mm_encoder_outputs. The
        # glimpse prefill reads more of the tower than those features, so the wrapper does not
        # advertise that argument and generate hands over pixel_values, as on 5.17.
        forward.__signature__ = fsig.replace(parameters=[
            q for q in fsig.parameters.values() if q.name != "mm_encoder_outputs"])
        model.forward = forward
        model.generate = generate
        self._active = True

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"GlimpseHandle(glimpse, K={self.head.reduce_layer}, {opts}, active={self._active})"



def apply_glimpse(model, head, threshold: Optional[float] = None, min_keep: Optional[int] = None,
                  max_ratio: Optional[float] = None) -> GlimpseHandle:
    """Prunes a LLaVA-1.5 or Qwen2.5-VL model's visual tokens with GlimpsePrune on every call with
    images.

    head: a GlimpseHead or a checkpoint directory (published format; loaded in the model's dtype
    and on its device). threshold, min_keep, max_ratio: the keep rule (ALGORITHMS.md step 4);
    None = the head's config (reduce_threshold, min_remain_num, max_remain_ratio), else 0.5 / 1 /
    no cap. Raises ValueError for another model class, a head built for another model, or an
    option out of range (threshold in (0, 1), max_ratio in (0, 1], min_keep >= 0).
    """
    family = _family_of(model)
    if not isinstance(head, GlimpseHead):
        import os
        if not isinstance(head, (str, os.PathLike)):
            raise ValueError(f"head must be a GlimpseHead or a checkpoint directory, got {type(head).__name__}")
        head = GlimpseHead.from_pretrained(head, model=model)
    head.check_model(model)
    p = next(model.parameters())
    hp = next(head.parameters())
    if hp.device != p.device:
        raise ValueError(f"GlimpseHead is on {hp.device}, the model on {p.device}: move it with head.to(...)")
    threshold = head.config.get("reduce_threshold") if threshold is None else threshold
    min_keep = head.config.get("min_remain_num") if min_keep is None else min_keep
    max_ratio = head.config.get("max_remain_ratio") if max_ratio is None else max_ratio
    threshold = 0.5 if threshold is None else threshold
    min_keep = 1 if min_keep is None else min_keep
    check_options(threshold, min_keep, max_ratio)
    current = getattr(model, "_vtk_pruning", None)
    if current is not None and getattr(current, "_active", False):
        raise ValueError(f"model is already pruned ({current!r}); call remove() first")
    handle = GlimpseHandle(model, family, head, float(threshold), int(min_keep),
                           None if max_ratio is None else float(max_ratio))
    handle._install()
    model._vtk_pruning = handle
    return handle
