"""Visual-token pruning for Hugging Face vision-language models.

    import vtkernels.hf as vhf
    handle = vhf.apply_pruning(model, method="vispruner", keep=64)
    out = model.generate(**inputs)      # inputs straight from the processor
    handle.remove()

``apply_pruning`` puts two instance attributes on the model, ``forward`` and ``generate``; the
class and every weight stay as they were, and ``remove()`` deletes the two attributes again.
When a call carries images, the wrapper

1. runs the vision tower with hooks on the layer the method reads (ALGORITHMS.md): the tower
   keeps its own attention kernel (SDPA, flash) and no attention map is ever formed or requested;
2. scores and selects with the vtk ops, per image (per crop on LLaVA-NeXT);
3. drops the pruned image placeholders from ``input_ids``, ``attention_mask`` and ``labels``,
   left-pads the rows back to one length, rebuilds the positions the family needs, and calls the
   model's own ``forward``/``generate`` with the embeddings.

``generate`` then returns the caller's ``input_ids`` followed by the new tokens, as it does
without pruning; ``forward`` returns logits over the compacted sequence.

Layout: ``base.py`` (what an adapter describes), one file per model family (``llava.py``,
``qwen_vl.py``), ``methods.py`` (the ops each method runs), ``capture.py`` (tower hooks),
``sequence.py`` (compaction), ``handle.py`` (``apply_pruning`` and the registries from model class
to adapter and from method name to an external implementation, ``register_method``).
"""
from .handle import PruningHandle, apply_pruning, pruning, register_adapter, register_method
from .llava import LlavaAdapter
from .methods import METHODS
from .qwen_vl import QwenVLAdapter

for _adapter in (LlavaAdapter, QwenVLAdapter):
    for _name in _adapter.classes:
        register_adapter(_name, _adapter)

__all__ = ["METHODS", "PruningHandle", "apply_pruning", "pruning", "register_adapter", "register_method"]
