"""What every model-family adapter fills in, and what it hands back for one pruned call.

The shared code (``handle.py``, ``methods.py``, ``sequence.py``) depends on these classes only,
never on a model family; each family's file (``llava.py``, ``qwen_vl.py``) subclasses them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager, List, Optional

from torch import Tensor, nn


@dataclass
class Plan:
    """A method and its validated options (``methods.make_plan``)."""
    method: str
    keep: int = 0
    important_ratio: float = 0.5
    dedup_step: int = 8
    knn: int = 32
    per_sample: bool = True

    @property
    def merges(self) -> bool:
        return self.method.startswith("prumerge")

    @property
    def plus(self) -> bool:
        return self.method == "prumerge_plus"


@dataclass
class Parts:
    """The pieces of a model that pruning touches, found once at apply time."""
    layers: nn.ModuleList  # vision tower layers (blocks)
    num_heads: int  # vision tower heads
    embed: nn.Module  # the language model's input embedding
    image_token_id: int  # the image placeholder in input_ids
    pad_id: int  # what compaction left-pads input_ids with


# A thunk giving one crop's kept positions (int64, ascending) on request: the Python side of that
# (and its host sync) is for pictures and reports, not for every forward.
Kept = Callable[[], Tensor]


@dataclass
class Prepared:
    """One call, pruned: what replaces the caller's arguments, and what the handle reports."""
    kwargs: dict  # the arguments the adapter built (inputs_embeds, attention_mask, ...)
    prompt_ids: Tensor  # the compacted input_ids (generate's output starts with them)
    lengths: List[int]  # visual tokens per image in the sequence
    kept: List[List[Kept]]  # per image, per crop
    projected: List[int]  # tokens per image that went through the projector (merger)
    # Entered around the model's own forward / generate (e.g. features injected into the LLM).
    context: ContextManager = field(default_factory=contextlib.nullcontext)


class Adapter:
    """One model family. ``__init__`` inspects the model (ValueError when it does not fit);
    ``prepare`` turns a call with images into a pruned one.

    Subclasses set ``classes`` (the exact transformers class names they serve; subclasses of those
    lay their inputs out differently) and ``unit`` (what ``keep`` counts, for messages).
    """
    classes: tuple = ()
    unit: str = "visual tokens per image"

    def __init__(self, model):
        self.model = model
        self.parts: Optional[Parts] = None

    def max_keep(self) -> Optional[int]:
        """The largest valid ``keep``, or None when an image with fewer tokens keeps them all."""
        return None

    def validate(self, plan: Plan) -> None:
        """Raises ValueError for a method or option this family cannot honour."""

    def has_images(self, call: dict) -> bool:
        return call.get("pixel_values") is not None

    def prepare(self, plan: Plan, input_ids: Tensor, call: dict, generating: bool) -> Prepared:
        """Pops from ``call`` every argument it consumes; the rest goes to the model unchanged."""
        raise NotImplementedError
