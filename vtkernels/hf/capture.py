"""Hooks that take q/k from the layer a method reads, and stop the tower once it has run enough.

The towers keep their own attention kernels (SDPA, flash): these hooks read the projections the
layers compute anyway, and no attention map is ever formed or requested.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Dict

from torch import Tensor, nn


class StopTower(Exception):
    """Raised from a forward hook once the vision tower has produced everything we read."""


def _output(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def run_cls_tower(tower: nn.Module, layers: nn.ModuleList, pixel_values: Tensor, feature_layer: int,
                  qk_layer: int):
    """CLIP-style tower: features [P, T, C] (output of ``feature_layer``) and q, k [P, T, C] of
    ``qk_layer`` (outputs of its ``q_proj`` / ``k_proj``).

    The tower stops after the last layer whose output something reads. When ``qk_layer`` lies one
    past it (PruMerge reads the last layer's q/k, LLaVA's features come from the one before), only
    that layer's layer_norm1, q_proj and k_proj run: its attention and MLP would be wasted.
    """
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
                raise StopTower
        return hook

    handles = [qk.q_proj.register_forward_hook(keep_q), qk.k_proj.register_forward_hook(keep_k)]
    for idx in sorted({feature_layer, stop_at}):
        handles.append(layers[idx].register_forward_hook(keep_layer(idx)))
    try:
        try:
            tower(pixel_values)
        except StopTower:
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


# --------------------------------------------------------------------------- packed towers (Qwen)

def rotary_of(attn: nn.Module):
    """The vision rotary function the attention module's own forward applies (its module's
    ``apply_rotary_pos_emb_vision``), so captured q/k are rotated bit for bit as the tower does,
    dtype round trips included."""
    fn = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb_vision", None)
    if fn is None:
        raise ValueError(f"{type(attn).__module__} has no apply_rotary_pos_emb_vision: this transformers "
                         "version's vision attention is not supported")
    return fn


@contextlib.contextmanager
def packed_block_qkv(attn: nn.Module, got: Dict[str, object]):
    """While active, one forward of ``attn`` (a Qwen vision attention: fused ``qkv`` Linear, rotary
    inside its forward) leaves in ``got``: "qkv" [S, 3C] (the fused projection's output, computed
    once, by the block itself), "cos"/"sin" (its position embeddings) and "cu_seqlens" (the segments
    it attends within). The rotation is applied afterwards by the caller (``rotary_of``): cheaper
    than a second projection, and nothing of the attention itself is recomputed."""

    def pre(_m, args, kwargs):
        emb = kwargs.get("position_embeddings")
        cu = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
        if emb is None or cu is None:
            raise RuntimeError(f"{type(attn).__name__} was called without position_embeddings / "
                               "cu_seqlens keywords: this transformers version is not supported")
        got["cos"], got["sin"] = emb
        got["cu_seqlens"] = cu

    def keep_qkv(_m, _a, out):
        got["qkv"] = out

    handles = [attn.register_forward_pre_hook(pre, with_kwargs=True),
               attn.qkv.register_forward_hook(keep_qkv)]
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def window_index_of(visual: nn.Module, got: Dict[str, object]):
    """Qwen2.5-VL: records the window order the tower permutes its merge units into (the
    ``window_index`` its ``permute_input_for_window_attn`` receives; merge unit ``window_index[j]``
    of the raster order sits at place j inside the blocks)."""
    original = visual.permute_input_for_window_attn
    if "permute_input_for_window_attn" in visual.__dict__:
        raise RuntimeError("the vision tower's permute_input_for_window_attn is already wrapped")

    def wrapper(input_tensor, window_index, *args, **kwargs):
        got.setdefault("window_index", window_index)
        return original(input_tensor, window_index, *args, **kwargs)

    visual.__dict__["permute_input_for_window_attn"] = wrapper
    try:
        yield got
    finally:
        visual.__dict__.pop("permute_input_for_window_attn", None)
