"""GlimpsePrune (ALGORITHMS.md): text-conditioned visual-token pruning inside the language model.

    from vtkernels.glimpse import GlimpseHead, apply_glimpse
    head = GlimpseHead.from_pretrained(DIR)      # published format: config.json + new_modules_gp.pt
    head = GlimpseHead.for_model(model)          # untrained, published defaults for that model
    handle = apply_glimpse(model, head)          # or apply_glimpse(model, DIR)
    out = model.generate(**inputs)

``head`` holds the learned parts and the checkpoint I/O, ``infer`` the pruned prefill and decoding
for LLaVA-1.5, ``flops`` the prefill FLOPs. Training (``train``, ``evaluate``) comes separately.
"""
from .flops import GlimpsePrefillFlops, prefill_flops
from .head import GlimpseHead, VisualImportancePredictor
from .infer import GlimpseHandle, apply_glimpse, keep_mask

__all__ = ["GlimpseHead", "VisualImportancePredictor", "GlimpseHandle", "apply_glimpse", "keep_mask",
           "GlimpsePrefillFlops", "prefill_flops"]
