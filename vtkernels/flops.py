"""Prefill FLOPs of a LLaVA model: vision tower, projector, language model.

What is counted: the matrix multiplications, at 2 FLOPs per multiply-add, which are more than
99% of the work at these sizes. Layer norms, activations, softmax, rotary embeddings, residual
adds and the pruning ops' own selection work are left out (the scoring ops cost about 2 T^2 C per
image for FoPru's attention map, under 0.01% of a 7B prefill).

With T vision tokens per crop (patches + CLS), width C, MLP width I, patch size p, N patches:

    vision    = crops * (2 N C 3 p^2                      patch embedding (a conv = a matmul)
                         + layers * (8 T C^2              q, k, v, o projections
                                     + 4 T^2 C            QK^T and AV, all heads
                                     + 4 T C I))          MLP (two matrices)
    projector = 2 V_p (C D + D^2)                         two linears over the V_p projected tokens
    language  = layers_lm * (2 S D (2 D + 2 D_kv)         q, o and the (grouped) k, v projections
                             + 4 S^2 D                    QK^T and AV, the full S x S products
                             + 6 S D I_lm)                SwiGLU MLP (three matrices)
                + 2 D V_vocab * logits_tokens             LM head (generate: the last token only)

S = visual tokens + text tokens (the whole prefill sequence), D the LM width, D_kv = kv heads x
head dim. Attention is counted as the full S x S product, as dense kernels compute it (a causal
kernel skips about half). Unpruned, Hugging Face runs every layer of the vision tower, though
LLaVA reads layer -2; pruned with vtkernels.hf, the tower stops at the feature layer (PruMerge adds
the last layer's q and k projections). ``vision_layers_run`` gives those counts.

Qwen2.5-VL and Qwen3-VL (``qwen_prefill_flops``; ``prefill_flops`` hands their configs to it): the
tower sees the images' patches packed, S = sum of t h w over the images, width C, MLP width I,
patch p, temporal patch tp, merge m (units of m^2 patches, U = S / m^2), LLM width D:

    vision    = 2 S C 3 tp p^2                            patch embedding (a Conv3d = a matmul)
              + blocks * (8 S C^2 + mlp S C I)            qkv (fused) and proj; MLP: 6 (Qwen2.5-VL,
                                                          gated) or 4 (Qwen3-VL) per S C I
              + 4 C * sum over attention segments of n^2  QK^T and AV: full-attention blocks attend
                                                          within each frame (n = h w), Qwen2.5-VL's
                                                          window blocks within each window
              + mergers * 2 U (m^2 C (m^2 C) + m^2 C D)   the merger (Qwen3-VL: + one per deepstack
                                                          layer), two linears over every unit
    language  = as above, S_lm = visual + text tokens

The tower always runs in full (the merger's output is the features), pruned or not; pruning
shortens the language model's sequence only. The scoring op's work is left out as above.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["PrefillFlops", "prefill_flops", "qwen_prefill_flops", "vision_layers_run", "llava_1_5_7b_config",
           "qwen2_5_vl_7b_config"]

QWEN_TYPES = ("qwen2_5_vl", "qwen3_vl")


@dataclass(frozen=True)
class PrefillFlops:
    vision: float
    projector: float
    language: float

    @property
    def total(self) -> float:
        return self.vision + self.projector + self.language

    def __str__(self) -> str:
        t = 1e12
        return (f"{self.total / t:.3f} TFLOPs (vision {self.vision / t:.3f}, projector "
                f"{self.projector / t:.3f}, language {self.language / t:.3f})")


def _get(cfg, name: str, default=None):
    v = getattr(cfg, name, None)
    return default if v is None else v


def vision_layers_run(config, method: Optional[str] = None) -> float:
    """Vision encoder layers a prefill runs: all of them unpruned (``method=None``, what Hugging Face
    does), up to the feature layer under vtkernels.hf. PruMerge's extra q/k projections of the
    last layer count as a fraction of a layer (returned as a float)."""
    vc = config.vision_config
    if getattr(config, "model_type", "") in QWEN_TYPES:
        return float(vc.depth)  # the merger reads the last block: the tower always runs in full
    L = vc.num_hidden_layers
    if method is None:
        return float(L)
    f = config.vision_feature_layer
    run = (f if f >= 0 else L + 1 + f)  # hidden_states[i] = output of layer i - 1: i layers run
    if method.startswith("prumerge") and run < L:
        # Layers up to L - 2 in full, then LN + q, k of the last: 4 T C^2 of its 8 T C^2 + ...
        run = max(run, L - 1)
        C, I = vc.hidden_size, vc.intermediate_size
        T = (vc.image_size // vc.patch_size) ** 2 + 1
        per_layer = 8 * T * C * C + 4 * T * T * C + 4 * T * C * I
        return run + (4 * T * C * C) / per_layer
    return float(run)


def prefill_flops(config, visual_tokens: int, text_tokens: int, *, crops: int = 1,
                  projected_tokens: Optional[int] = None, vision_layers: Optional[float] = None,
                  logits_tokens: int = 1, batch: int = 1, grids=None) -> PrefillFlops:
    """FLOPs of one prefill of a LLaVA ``config`` (LlavaConfig or LlavaNextConfig).

    visual_tokens: image tokens in the language model's sequence (kept tokens, newlines included);
    text_tokens: the rest of the prompt; crops: images (or anyres crops) through the vision tower;
    projected_tokens: tokens through the projector (default visual_tokens); vision_layers: encoder
    layers run (default all, see ``vision_layers_run``); logits_tokens: positions the LM head
    scores (1, as generate does; S for a full forward). Returns per-part FLOPs for ``batch``
    sequences. The formula is in this module's docstring. Qwen2.5-VL / Qwen3-VL configs go to
    ``qwen_prefill_flops`` (pass ``grids=``, the images' ``image_grid_thw``).
    """
    if getattr(config, "model_type", "") == "qwen3_5":
        raise ValueError("Qwen3.5's language model mixes gated delta-net (linear attention) layers in, "
                         "which vtkernels.flops does not count")
    if getattr(config, "model_type", "") in QWEN_TYPES:
        if grids is None:
            raise ValueError("Qwen-VL prefill FLOPs need grids= (image_grid_thw: the tower's work depends on "
                             "each image's size)")
        return qwen_prefill_flops(config, grids, visual_tokens, text_tokens, logits_tokens=logits_tokens,
                                  batch=batch)
    vc, tc = config.vision_config, config.text_config
    C, I, p = vc.hidden_size, vc.intermediate_size, vc.patch_size
    N = (vc.image_size // p) ** 2
    T = N + 1
    layers = vc.num_hidden_layers if vision_layers is None else vision_layers
    per_layer = 8 * T * C * C + 4 * T * T * C + 4 * T * C * I
    vision = crops * (2 * N * C * 3 * p * p + layers * per_layer)

    D = tc.hidden_size
    Vp = visual_tokens if projected_tokens is None else projected_tokens
    projector = 2 * Vp * (C * D + D * D)
    language = _language_flops(tc, visual_tokens + text_tokens, logits_tokens)
    return PrefillFlops(vision=float(batch * vision), projector=float(batch * projector),
                        language=float(batch * language))


def _language_flops(tc, S: int, logits_tokens: int) -> float:
    D, I_lm = tc.hidden_size, tc.intermediate_size
    heads = tc.num_attention_heads
    head_dim = _get(tc, "head_dim", D // heads)
    d_q = heads * head_dim
    d_kv = _get(tc, "num_key_value_heads", heads) * head_dim
    per_lm_layer = 2 * S * D * (2 * d_q + 2 * d_kv) + 4 * S * S * d_q + 6 * S * D * I_lm
    return tc.num_hidden_layers * per_lm_layer + 2 * D * tc.vocab_size * logits_tokens


def _window_lengths(gh: int, gw: int, ws: int) -> list:
    """Merge units per window of a gh x gw unit grid cut into ws x ws windows (partial at the edges)."""
    return [min(ws, gh - r) * min(ws, gw - c) for r in range(0, gh, ws) for c in range(0, gw, ws)]


def qwen_prefill_flops(config, grids, visual_tokens: int, text_tokens: int, *, logits_tokens: int = 1,
                       batch: int = 1) -> PrefillFlops:
    """FLOPs of one prefill of a Qwen2.5-VL or Qwen3-VL ``config`` whose images have the patch
    grids ``grids`` ([[t, h, w], ...], the processor's ``image_grid_thw``), with ``visual_tokens``
    image tokens in the language model's sequence (pruned or not) and ``text_tokens`` others. The
    tower's work is in ``vision``, its merger(s) in ``projector``. Formula: module docstring."""
    if getattr(config, "model_type", "") not in QWEN_TYPES:
        raise ValueError(f"qwen_prefill_flops counts {', '.join(QWEN_TYPES)}, got {getattr(config, 'model_type', None)!r}")
    vc, tc = config.vision_config, config.text_config
    grids = [list(map(int, g)) for g in (grids.tolist() if hasattr(grids, "tolist") else grids)]
    C, I, p, tp, m = vc.hidden_size, vc.intermediate_size, vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size
    S = sum(t * h * w for t, h, w in grids)
    U = S // (m * m)
    qwen25 = config.model_type == "qwen2_5_vl"
    blocks = vc.depth
    mlp = 6 if qwen25 else 4  # gated (gate, up, down) or two linears
    vision = 2 * S * C * 3 * tp * p * p + blocks * (8 * S * C * C + mlp * S * C * I)
    frames = sum(t * (h * w) ** 2 for t, h, w in grids)  # a full-attention segment per frame
    if qwen25:
        ws = vc.window_size // p // m
        windows = sum(t * sum((n * m * m) ** 2 for n in _window_lengths(h // m, w // m, ws)) for t, h, w in grids)
        full = len(vc.fullatt_block_indexes)
        vision += 4 * C * (full * frames + (blocks - full) * windows)
    else:
        vision += 4 * C * blocks * frames
    mergers = 1 + len(_get(vc, "deepstack_visual_indexes", []) if not qwen25 else [])
    Cm = m * m * C
    projector = mergers * 2 * U * (Cm * Cm + Cm * vc.out_hidden_size)
    language = _language_flops(tc, visual_tokens + text_tokens, logits_tokens)
    return PrefillFlops(vision=float(batch * vision), projector=float(batch * projector),
                        language=float(batch * language))


def llava_1_5_7b_config():
    """The shapes of LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14 at 336 px, Vicuna-7B."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14,
                              projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                       max_position_embeddings=4096, rms_norm_eps=1e-5)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu")


def qwen2_5_vl_7b_config():
    """The shapes of Qwen2.5-VL-7B-Instruct: a 32-block tower of width 1280 (full attention in blocks
    7, 15, 23, 31; windows of 112 px), 14 px patches, 2 x 2 merge, a 28-layer LLM of width 3584."""
    from transformers import Qwen2_5_VLConfig
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")
    text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text)
