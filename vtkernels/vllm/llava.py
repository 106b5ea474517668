"""LLaVA-1.5 in vLLM, pruned to a fixed number of visual tokens per image.

Imported by vLLM (lazily, from the "module:Class" string that ``vtkernels.vllm.register`` gives
its ModelRegistry), never at plugin load.

- Placeholders: the processing info reports ``keep`` tokens per image instead of the patch count,
  so vLLM's own prompt replacement puts ``keep`` image tokens into the prompt and reserves
  ``keep`` slots of KV cache. LLaVA uses 1-D positions: those slots get consecutive positions,
  the compact re-indexing the published LLaVA code does (and vtkernels.hf does).
- Embedding step: vLLM's tower is built only up to the feature layer, so its last layer is the
  one every fixed-budget method reads (ALGORITHMS.md). A forward hook on that layer's fused
  ``qkv_proj`` takes q and k as the layer computes them (its attention stays vLLM's fused
  kernel); the tower's output (patches, CLS dropped) is the feature ``x``. The vtk ops score and
  select; only the kept rows go through the projector.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor
from transformers import CLIPVisionConfig

from vllm.config import VllmConfig
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .. import ops
from ._common import all_heads, hooked, need
from .options import PruningOptions, parse_options

ARCH = "VtkLlavaForConditionalGeneration"


def _grid(hf_config) -> int:
    v = hf_config.vision_config
    return v.image_size // v.patch_size


def llava_options(hf_config) -> PruningOptions:
    """The pruning options of a LLaVA-1.5 config, or ValueError: what the scores need of the
    model (a CLIP tower with CLS, one feature layer, CLS dropped) is checked here too, so a model
    that cannot be pruned fails at engine start, not at its first image."""
    v = hf_config.vision_config
    if not isinstance(v, CLIPVisionConfig):
        raise ValueError(f"{ARCH} needs a CLIP vision tower (token 0 = CLS, whose attention row "
                         f"the scores read), got {type(v).__name__}")
    layer = hf_config.vision_feature_layer
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"{ARCH} needs a single vision_feature_layer (an int), got {layer!r}")
    strategy = hf_config.vision_feature_select_strategy
    if strategy != "default":
        raise ValueError(f"{ARCH} needs vision_feature_select_strategy='default' (CLS dropped), "
                         f"got {strategy!r}")
    g = _grid(hf_config)
    return parse_options(hf_config, ARCH, max_keep=g * g)


class VtkLlavaProcessingInfo(LlavaProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        # LLaVA-1.5 resizes every image to the tower's square input: each has grid^2 patches,
        # of which `keep` (validated <= grid^2) stay. The max-token count used for profiling and
        # scheduling goes through here too.
        return llava_options(self.get_hf_config()).keep


@MULTIMODAL_REGISTRY.register_processor(
    LlavaMultiModalProcessor,
    info=VtkLlavaProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class VtkLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 whose image embedding step returns ``keep`` pruned tokens per image."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        # Options first: a bad one fails before any weight is allocated.
        self.vtk_options = llava_options(vllm_config.model_config.hf_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        layers = self.vision_tower.vision_model.encoder.layers
        self._vtk_attn = layers[-1].self_attn  # the feature layer: the tower ends there
        self._vtk_grid = _grid(self.config)

    def _vtk_tower(self, pixel_values: Tensor):
        """(x [n, N, C] = feature-layer patches, q, k [n, T, C] of that layer, all heads)."""
        attn = self._vtk_attn
        got: Dict[str, Tensor] = {}

        def take_qk(_m, _args, out):
            # The same split CLIPAttention.forward makes of the fused projection.
            got["q"], got["k"], _ = out[0].chunk(3, dim=-1)

        with hooked(attn.qkv_proj, take_qk):
            x = self._image_pixels_to_features(self.vision_tower, pixel_values)
        need(got, ("q", "k"), "the feature layer's qkv_proj")
        return x, all_heads(got["q"], attn.tp_size), all_heads(got["k"], attn.tp_size)

    def vtk_select(self, pixel_values: Tensor):
        """(kept features [n, keep, C] before the projector, kept positions [n, keep] ascending)."""
        o = self.vtk_options
        x, q, k = self._vtk_tower(pixel_values)
        heads = self.config.vision_config.num_attention_heads
        if x.shape[1] != self._vtk_grid ** 2:
            raise RuntimeError(f"vision tower gave {x.shape[1]} patch tokens, expected {self._vtk_grid ** 2}")
        if o.method == "vispruner":
            scores = ops.cls_attention(q, k, heads)
            idx = ops.vispruner_select(x, scores, o.keep, o.important_ratio, o.dedup_step)
            return ops.gather_tokens(x, idx), idx
        scores = ops.fopru_significance(q, k, heads)
        strategy = "rank" if o.method == "fopru_rank" else "row"
        tokens, idx = ops.fopru_select(x, scores, o.keep, strategy, self._vtk_grid)
        return tokens, idx

    def _process_image_pixels(self, inputs) -> Tensor:
        # Called by LlavaForConditionalGeneration._process_image_input, which then projects what
        # this returns: only the kept tokens reach the projector.
        with torch.no_grad():
            tokens, _ = self.vtk_select(inputs["pixel_values"])
        return tokens
