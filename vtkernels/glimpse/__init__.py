"""GlimpsePrune (ALGORITHMS.md): text-conditioned visual-token pruning inside the language model.

    from vtkernels.glimpse import GlimpseHead, apply_glimpse
    head = GlimpseHead.from_pretrained(DIR)      # published format: config.json + new_modules_gp.pt
    head = GlimpseHead.for_model(model)          # untrained, published defaults for that model
    handle = apply_glimpse(model, head)          # or apply_glimpse(model, DIR)
    out = model.generate(**inputs)

``head`` holds the learned parts and the checkpoint I/O, ``infer`` the pruned prefill and decoding
for LLaVA-1.5, ``flops`` the prefill FLOPs; ``data`` (rows, box masks), ``adapters`` (what a model
family adds to training) and ``train`` (``train``, ``evaluate``) the training from box annotations.
"""
from .flops import GlimpsePrefillFlops, prefill_flops
from .head import GlimpseHead, VisualImportancePredictor
from .infer import GlimpseHandle, apply_glimpse, keep_mask
from .data import BadDataError, GlimpseDataset, read_rows
from .train import TrainResult, evaluate, train



def _apply_from_hf(model, head=None, threshold=None, min_keep=None, max_ratio=None):
    """``vtkernels.hf.apply_pruning(model, "glimpse", head=..., ...)`` lands here."""
    if head is None:
        raise ValueError("method 'glimpse' needs head= (a GlimpseHead or a checkpoint directory; "
                         "GlimpseHead.for_model(model) builds an untrained one)")
    return apply_glimpse(model, head, threshold=threshold, min_keep=min_keep, max_ratio=max_ratio)


def _register() -> None:
    # The arrow points from glimpse to hf: hf only knows this module's name (hf.handle._PROVIDERS).
    from vtkernels.hf import register_method
    register_method("glimpse", _apply_from_hf, {"head": None, "threshold": None, "min_keep": None,
                                                "max_ratio": None})


_register()

__all__ = ["GlimpseHead", "VisualImportancePredictor", "GlimpseHandle", "apply_glimpse", "keep_mask",
           "GlimpsePrefillFlops", "prefill_flops", "BadDataError", "GlimpseDataset", "read_rows", "TrainResult",
           "train", "evaluate"]
