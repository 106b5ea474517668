"""``apply_pruning``, ``pruning``, ``PruningHandle``, and the two registries behind them.

Adapters: a registry from model class (its exact transformers class name) to the adapter of its
family (``register_adapter``; the built-in ones are registered in ``vtkernels/hf/__init__.py``).
An adapter inspects the model at apply time and, per call with images, hands back the pruned
arguments for the model's own ``forward`` / ``generate`` (``base.Adapter.prepare``).

Methods: the training-free methods (``methods.METHODS``) run through the adapters. A method that
works differently, e.g. inside the language model (GlimpsePrune, method ``"glimpse"``), registers
itself from its own package, so that nothing here imports it::

    # vtkernels/glimpse/__init__.py
    from vtkernels.hf import register_method
    register_method("glimpse", apply_glimpse, {"head": None, "threshold": None, ...})

``apply_pruning(model, "glimpse", **options)`` then checks the options against that dict and
returns ``apply_glimpse(model, **options)``, which must return an object with ``remove()`` (a
``PruningHandle`` subclass fits; it is also the context manager ``pruning`` uses). Packages
listed in ``_PROVIDERS`` are imported on first use of their method name, so a user never has to
import them by hand; the import happens inside ``apply_pruning``, never at import of this module.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import inspect
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

from .base import Adapter, Plan
from .methods import BUILTIN, METHODS, make_plan

__all__ = ["PruningHandle", "apply_pruning", "pruning", "register_adapter", "register_method"]

_ADAPTERS: Dict[str, Callable[[object], Adapter]] = {}
_METHOD_FACTORIES: Dict[str, Callable] = {}
# method name -> the module that registers it when imported (kept as a string: no import arrow).
_PROVIDERS: Dict[str, str] = {"glimpse": "vtkernels.glimpse"}


def register_adapter(class_name: str, factory: Callable[[object], Adapter]) -> None:
    """Serves models whose class is exactly ``transformers.<class_name>`` with ``factory(model)``."""
    _ADAPTERS[class_name] = factory


def register_method(name: str, factory: Callable, options: Dict[str, object]) -> None:
    """Adds a method that ``apply_pruning(model, name, **opts)`` hands to ``factory(model, **opts)``.

    ``options`` maps each accepted option to its default (None = none); unknown options are a
    ValueError before ``factory`` runs. The built-in methods cannot be replaced.
    """
    if name in BUILTIN:
        raise ValueError(f"method {name!r} is built in and cannot be re-registered")
    METHODS[name] = dict(options)
    _METHOD_FACTORIES[name] = factory


def supported_classes() -> List[str]:
    return sorted(_ADAPTERS)


def adapter_for(model) -> Adapter:
    """The adapter of ``model``'s family; ValueError naming the supported classes otherwise."""
    cls = type(model)
    factory = _ADAPTERS.get(cls.__name__)
    if factory is not None:
        import transformers
        # Exact classes: subclasses (video variants, other families) lay their inputs out differently.
        if getattr(transformers, cls.__name__, None) is not cls:
            factory = None
    if factory is None:
        raise ValueError(f"vtkernels.hf supports {', '.join(supported_classes())}; got {cls.__name__}")
    return factory(model)


# --------------------------------------------------------------------------- call plumbing

_MISSING = object()


def bind_call(sig: inspect.Signature, args, kwargs) -> dict:
    """The call's arguments by name, the **kwargs part merged in, defaults left out (also used by
    the method providers: vtkernels.glimpse)."""
    bound = sig.bind_partial(*args, **kwargs).arguments
    for name, p in sig.parameters.items():
        if p.kind is p.VAR_KEYWORD:
            bound.update(bound.pop(name, {}) or {})
        elif p.kind is p.VAR_POSITIONAL and bound.pop(name, ()):
            raise TypeError(f"unexpected positional arguments for {name}")
    return bound


class ModelWrapper:
    """What a pruning handle shares: it puts ``forward`` and ``generate`` on the model as instance
    attributes (the class and the weights stay as they were), ``remove()`` takes them off again
    (idempotent), and it is a context manager. Subclasses call ``_remember(model)`` first and set
    ``_active`` once installed."""

    _WRAPPED = ("forward", "generate")

    def _remember(self, model) -> None:
        self.model = model
        self._saved = {name: model.__dict__.get(name, _MISSING) for name in self._WRAPPED}
        self._active = False

    def remove(self) -> None:
        """Gives the model back exactly as it was (idempotent)."""
        if not self._active:
            return
        for name, saved in self._saved.items():
            if saved is _MISSING:
                self.model.__dict__.pop(name, None)
            else:
                setattr(self.model, name, saved)
        if getattr(self.model, "_vtk_pruning", None) is self:
            del self.model._vtk_pruning
        self._active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _shift_lengths(model, call: dict, prompt_len: int, compact_len: int) -> None:
    """Keeps the number of new tokens of ``generate`` under pruning.

    ``max_length`` and ``min_length`` count the prompt, which pruning shortens: where they decide
    the length (no ``max_new_tokens`` / ``min_new_tokens``), they are shifted by the tokens pruned,
    whether they come from a keyword, the passed ``generation_config`` or
    ``model.generation_config`` (same precedence as transformers). The transformers default
    (``max_length`` 20 new tokens, capped by ``max_position_embeddings``) is kept as unpruned.
    Edits ``call`` only: a passed config is copied, ``model.generation_config`` is left alone.
    """
    shift = compact_len - prompt_len
    if shift == 0:
        return
    gc = call.get("generation_config")
    model_gc = getattr(model, "generation_config", None)

    def effective(name):
        for src in (call, vars(gc) if gc is not None else None, vars(model_gc) if model_gc is not None else None):
            if src is not None and src.get(name) is not None:
                return src[name]
        return None

    updates = {}
    if effective("max_new_tokens") is None:
        max_length = effective("max_length")
        if max_length is None:  # transformers: `default` new tokens, at most max_position_embeddings in all
            default = 20
            defaults = getattr(type(model_gc), "_get_default_generation_params", None) if model_gc is not None else None
            if defaults is not None:
                default = defaults().get("max_length", default) or default
            cap = getattr(model.config, "max_position_embeddings", None)
            if cap is not None and prompt_len + default > cap:
                max_length = cap
        if max_length is not None:
            updates["max_length"] = max_length + shift
    if effective("min_new_tokens") is None:
        min_length = effective("min_length")
        if min_length:
            updates["min_length"] = max(min_length + shift, 0)
    for name, value in updates.items():
        if call.get(name) is not None or gc is None:
            call[name] = value
        else:
            if call.get("generation_config") is gc:
                gc = call["generation_config"] = copy.deepcopy(gc)
            setattr(gc, name, value)


# --------------------------------------------------------------------------- the handle

class PruningHandle(ModelWrapper):
    """What ``apply_pruning`` returns: ``remove()`` puts the model back; also a context manager.

    After each pruned call: ``last_lengths`` = visual tokens per image in the sequence (newline
    tokens included), ``last_kept`` = kept positions per image and per crop (raster positions in
    the crop's grid; Qwen: in the image's merged grid, one "crop"; PruMerge: the merge centres),
    ``last_projected`` = tokens per image that went through the projector (Qwen: the merger, which
    sees every merge unit).
    """

    def __init__(self, model, adapter: Adapter, plan: Plan, options: dict):
        self._remember(model)
        self.method = plan.method
        self.options = dict(options)
        self._kept_fns: list = []
        self._kept: Optional[List[List[Tensor]]] = None
        self.last_lengths: List[int] = []
        self.last_projected: List[int] = []
        self._adapter = adapter
        self._plan = plan

    @property
    def last_kept(self) -> List[List[Tensor]]:
        if self._kept is None:
            self._kept = [[fn() for fn in crops] for crops in self._kept_fns]
        return self._kept

    def _prepare(self, input_ids, call: dict, generating: bool):
        prep = self._adapter.prepare(self._plan, input_ids, call, generating)
        self._kept_fns, self._kept = prep.kept, None
        self.last_lengths = list(prep.lengths)
        self.last_projected = list(prep.projected)
        return prep

    def _install(self):
        model = self.model
        adapter = self._adapter
        orig_forward = model.forward
        orig_generate = model.generate
        fsig = inspect.signature(orig_forward)

        @functools.wraps(orig_forward)
        def forward(*args, **kwargs):
            bound = bind_call(fsig, args, kwargs)
            if not adapter.has_images(bound):
                return orig_forward(*args, **kwargs)
            input_ids = bound.pop("input_ids", None)
            if input_ids is None:
                raise ValueError("pruning needs input_ids to find the image placeholders")
            if bound.pop("inputs_embeds", None) is not None:
                raise ValueError("pass input_ids, not inputs_embeds, with pixel_values under pruning")
            # Positions are rebuilt for the compacted sequence; the caller's refer to the
            # placeholders that are gone.
            bound.pop("position_ids", None)
            bound.pop("cache_position", None)
            prep = self._prepare(input_ids, bound, generating=False)
            with prep.context:
                return orig_forward(**prep.kwargs, **bound)

        gsig = inspect.signature(orig_generate)

        @functools.wraps(orig_generate)
        def generate(*args, **kwargs):
            call = bind_call(gsig, args, kwargs)
            input_ids = call.pop("input_ids", None)
            inputs = call.pop("inputs", None)
            input_ids = inputs if input_ids is None else input_ids
            if not adapter.has_images(call) or input_ids is None:
                return orig_generate(*args, **kwargs)
            if call.pop("inputs_embeds", None) is not None:
                raise ValueError("pass input_ids, not inputs_embeds, with pixel_values under pruning")
            call.pop("labels", None)
            call.pop("position_ids", None)
            # Pruned once, before generation starts: generate then sees a plain (shorter) prompt,
            # and its attention mask, cache and positions agree from the first step on.
            prep = self._prepare(input_ids, call, generating=True)
            ids = prep.prompt_ids
            _shift_lengths(model, call, input_ids.shape[1], ids.shape[1])
            with prep.context:
                out = orig_generate(**prep.kwargs, **call)
            seq = out if isinstance(out, Tensor) else out.sequences
            prompt = input_ids.to(seq.device)
            if seq.shape[0] != prompt.shape[0]:  # beams / num_return_sequences: rows per prompt
                prompt = prompt.repeat_interleave(seq.shape[0] // prompt.shape[0], dim=0)
            full = torch.cat([prompt, seq[:, ids.shape[1]:]], dim=1)
            if isinstance(out, Tensor):
                return full
            out.sequences = full
            return out

        model.forward = forward
        model.generate = generate
        self._active = True

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"PruningHandle({self.method}{', ' + opts if opts else ''}, active={self._active})"


def _registered(method: str):
    """The factory of a registered method, importing its provider on first use."""
    if method not in _METHOD_FACTORIES and method in _PROVIDERS:
        try:
            importlib.import_module(_PROVIDERS[method])
        except ImportError as e:
            raise ValueError(f"method {method!r} is provided by {_PROVIDERS[method]}, which failed to "
                             f"import: {e}") from e
    return _METHOD_FACTORIES.get(method)


def apply_pruning(model, method: str, **options) -> PruningHandle:
    """Prunes the visual tokens of a supported Hugging Face VLM on every call with images.

    method: "fopru_rank", "fopru_row" (option ``keep``), "vispruner" (``keep``,
    ``important_ratio=0.5``, ``dedup_step=8``), "prumerge", "prumerge_plus" (adaptive count;
    ``knn=32``, ``per_sample=True``), or a registered method (``register_method``).

    ``keep`` is a per-image budget. LLaVA-1.5: visual tokens per image; LLaVA-NeXT: per crop;
    both must lie in [1, tokens per crop]. Qwen2.5-VL / Qwen3-VL / Qwen3.5: merge units (LLM
    tokens) per image, at least 1; an image with at most ``keep`` merge units keeps them all.
    Raises ValueError for another model class, an unknown method or option, or a bad ``keep``.
    """
    adapter = adapter_for(model)
    if method not in BUILTIN:
        factory = _registered(method)
        if factory is None:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        unknown = sorted(set(options) - set(METHODS[method]))
        if unknown:
            raise ValueError(f"method {method!r} takes options {sorted(METHODS[method])}, got unknown {unknown}")
        current = getattr(model, "_vtk_pruning", None)
        if current is not None and current._active:
            raise ValueError(f"model is already pruned ({current!r}); call remove() first")
        return factory(model, **options)
    plan = make_plan(method, options, adapter)
    current = getattr(model, "_vtk_pruning", None)
    if current is not None and current._active:
        raise ValueError(f"model is already pruned ({current!r}); call remove() first")
    handle = PruningHandle(model, adapter, plan, options)
    handle._install()
    model._vtk_pruning = handle
    return handle


@contextlib.contextmanager
def pruning(model, method: str, **options):
    """``with pruning(model, method="fopru_row", keep=144): ...`` -- pruned inside, original after."""
    handle = apply_pruning(model, method, **options)
    try:
        yield handle
    finally:
        handle.remove()
