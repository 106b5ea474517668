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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["PrefillFlops", "prefill_flops", "vision_layers_run", "llava_1_5_7b_config"]


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
                  logits_tokens: int = 1, batch: int = 1) -> PrefillFlops:
    """FLOPs of one prefill of a LLaVA ``config`` (LlavaConfig or LlavaNextConfig).

    visual_tokens: image tokens in the language model's sequence (kept tokens, newlines included);
    text_tokens: the rest of the prompt; crops: images (or anyres crops) through the vision tower;
    projected_tokens: tokens through the projector (default visual_tokens); vision_layers: encoder
    layers run (default all, see ``vision_layers_run``); logits_tokens: positions the LM head
    scores (1, as generate does; S for a full forward). Returns per-part FLOPs for ``batch``
    sequences. The formula is in this module's docstring.
    """
    vc, tc = config.vision_config, config.text_config
    C, I, p = vc.hidden_size, vc.intermediate_size, vc.patch_size
    N = (vc.image_size // p) ** 2
    T = N + 1
    layers = vc.num_hidden_layers if vision_layers is None else vision_layers
    per_layer = 8 * T * C * C + 4 * T * T * C + 4 * T * C * I
    vision = crops * (2 * N * C * 3 * p * p + layers * per_layer)

    D, I_lm = tc.hidden_size, tc.intermediate_size
    heads = tc.num_attention_heads
    head_dim = _get(tc, "head_dim", D // heads)
    d_q = heads * head_dim
    d_kv = _get(tc, "num_key_value_heads", heads) * head_dim
    Vp = visual_tokens if projected_tokens is None else projected_tokens
    projector = 2 * Vp * (C * D + D * D)
    S = visual_tokens + text_tokens
    per_lm_layer = 2 * S * D * (2 * d_q + 2 * d_kv) + 4 * S * S * d_q + 6 * S * D * I_lm
    language = tc.num_hidden_layers * per_lm_layer + 2 * D * tc.vocab_size * logits_tokens
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
