"""Prefill FLOPs of a GlimpsePrune prefill (LLaVA-1.5, Qwen2.5-VL), counted as vtkernels.flops
counts them.

    vision     LLaVA: the tower up to the deepest layer read (feature layer or a VIP condition);
               Qwen2.5-VL: the whole tower (the merger reads the last block)
    projector  every image token (the pruning happens inside the LLM, after the projector / merger)
    language   layers 0..K on S1 = text + image + 1 (the glimpse) tokens, then layers K+1..L-1 on
               S2 = text + kept tokens, plus the LM head on ``logits_tokens`` positions
    vip        per image of N tokens (Qwen: N = its merge units): in_proj 2 N Hq w; conditions 4 x 2 N C c; per block q, k
               2 x 2 N (w + c)^2, v and o 2 x 2 N w^2, QK^T 2 N^2 (w + c), AV 2 N^2 w, SwiGLU
               3 x 2 N w (2w); out 2 N w  (w = attn_fuse_size, c = visual_cond_size)
    glimpse    le_proj on the L glimpse vectors (2 L H^2) and the glimpse row (2 Hq D S1)

The language part reuses vtkernels.flops.prefill_flops on configs with the layer count of each
stage. Layers 0..K always run in full, so the language saving is at most (L - K - 1) / L.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

from .. import flops as _flops
from .head import GlimpseHead, default_condition_layers, default_reduce_layer

__all__ = ["GlimpsePrefillFlops", "prefill_flops", "language_saving_bound"]


@dataclass(frozen=True)
class GlimpsePrefillFlops:
    vision: float
    projector: float
    language_full: float  # layers 0..K, full sequence + glimpse
    language_pruned: float  # layers K+1.., kept tokens, and the LM head
    vip: float
    glimpse: float

    @property
    def language(self) -> float:
        return self.language_full + self.language_pruned

    @property
    def total(self) -> float:
        return self.vision + self.projector + self.language + self.vip + self.glimpse

    def __str__(self) -> str:
        t = 1e12
        return (f"{self.total / t:.3f} TFLOPs (vision {self.vision / t:.3f}, projector {self.projector / t:.3f}, "
                f"language {self.language / t:.3f} = {self.language_full / t:.3f} full + "
                f"{self.language_pruned / t:.3f} pruned, VIP {self.vip / t:.4f}, glimpse {self.glimpse / t:.4f})")


def language_saving_bound(num_layers: int, reduce_layer: int) -> float:
    """(L - K - 1) / L: the share of the LLM's layers that GlimpsePrune can shorten."""
    return (num_layers - reduce_layer - 1) / num_layers


def _with_layers(config, n: int):
    cfg = copy.deepcopy(config)
    cfg.text_config.num_hidden_layers = n
    return cfg


def prefill_flops(model, n_text: int, n_image: int, kept: int, *, head: Optional[GlimpseHead] = None,
                  reduce_layer: Optional[int] = None, images: Optional[int] = None, logits_tokens: int = 1,
                  batch: int = 1, grids=None) -> GlimpsePrefillFlops:
    """FLOPs of one GlimpsePrune prefill of a LLaVA-1.5 or Qwen2.5-VL ``model`` (or its config).

    n_text: prompt tokens that are not image tokens; n_image: image tokens in the prompt (LLaVA:
    images x N; Qwen: the merge units of ``grids``); kept: image tokens kept (all images
    together); images: LLaVA images through the tower (default n_image / N); grids: Qwen's
    ``image_grid_thw`` (required there: the tower's and the VIP's work depend on each image's
    size). K and the condition layers come from ``head``, else ``reduce_layer`` / the published
    defaults (GlimpseHead.for_model). Returns per-part FLOPs for ``batch`` rows.
    """
    config = getattr(model, "config", model)
    vc, tc = config.vision_config, config.text_config
    L, H = tc.num_hidden_layers, tc.hidden_size
    qwen = getattr(config, "model_type", "") == "qwen2_5_vl"
    if qwen:
        if grids is None:
            raise ValueError("Qwen2.5-VL glimpse FLOPs need grids= (image_grid_thw)")
        m = vc.spatial_merge_size
        grids = [list(map(int, g)) for g in (grids.tolist() if hasattr(grids, "tolist") else grids)]
        sizes = [t * (h // m) * (w // m) for t, h, w in grids]
        if sum(sizes) != n_image:
            raise ValueError(f"n_image={n_image} but the grids hold {sum(sizes)} merge units")
        images = len(sizes)
    else:
        N = (vc.image_size // vc.patch_size) ** 2
        if images is None:
            if n_image % N:
                raise ValueError(f"n_image={n_image} is not a whole number of {N}-token images: pass images=")
            images = n_image // N
        sizes = [N] * images
    if not 0 <= kept <= n_image:
        raise ValueError(f"kept={kept} must be in [0, n_image={n_image}]")
    if head is not None:
        K, conds = head.reduce_layer, head.selected_visual_layers
        w, c = int(head.config["attn_fuse_size"]), int(head.config["visual_cond_size"])
    else:
        K = default_reduce_layer(L, H) if reduce_layer is None else reduce_layer
        family = "qwen2_5_vl" if qwen else "llava"
        depth = vc.depth if qwen else vc.num_hidden_layers
        conds, w, c = default_condition_layers(family, depth), 256, 512
    if not 0 <= K < L:
        raise ValueError(f"reduce_layer={K} must be in [0, {L - 1}]")
    if qwen:
        base = _flops.qwen_prefill_flops(config, grids, n_image, n_text, logits_tokens=0)
        full = _flops.qwen_prefill_flops(_with_layers(config, K + 1), grids, n_image + 1, n_text,
                                         logits_tokens=0).language
        pruned = _flops.qwen_prefill_flops(_with_layers(config, L - K - 1), grids, kept, n_text,
                                           logits_tokens=logits_tokens).language
    else:
        depth = vc.num_hidden_layers
        run = max([config.vision_feature_layer % (depth + 1)] + [i % (depth + 1) for i in conds])
        base = _flops.prefill_flops(config, n_image, n_text, crops=images, vision_layers=run, logits_tokens=0)
        full = _flops.prefill_flops(_with_layers(config, K + 1), n_image + 1, n_text, crops=images,
                                    vision_layers=0, logits_tokens=0).language
        pruned = _flops.prefill_flops(_with_layers(config, L - K - 1), kept, n_text, crops=images,
                                      vision_layers=0, logits_tokens=logits_tokens).language
    Hq = tc.num_attention_heads
    D = getattr(tc, "head_dim", None) or H // Hq
    C = vc.hidden_size
    blocks = len(conds)

    def per_image(N):
        per_block = (2 * 2 * N * (w + c) ** 2 + 2 * 2 * N * w * w + 2 * N * N * (w + c) + 2 * N * N * w
                     + 3 * 2 * N * w * (2 * w))
        return 2 * N * Hq * w + blocks * 2 * N * C * c + blocks * per_block + 2 * N * w

    vip = sum(per_image(N) for N in sizes)
    S1 = n_text + n_image + 1
    glimpse = 2 * L * H * H + 2 * Hq * D * S1
    return GlimpsePrefillFlops(vision=float(batch * base.vision), projector=float(batch * base.projector),
                               language_full=float(batch * full), language_pruned=float(batch * pruned),
                               vip=float(batch * vip), glimpse=float(batch * glimpse))
