"""What every Triton launcher shares: the interpreter switch and the device guard."""
from __future__ import annotations

import contextlib
import functools
import inspect
import os

import torch

from .. import _validate as V


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1: kernels run on CPU tensors, and launchers pick big tiles
    (fewer interpreted steps) instead of the GPU configurations."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def device_guard(device):
    """A context in which Triton launches on `device`.

    Triton launches on the current CUDA device, whatever device the pointers belong to: an input
    on cuda:1 while cuda:0 is current would run (and allocate scratch) on the wrong GPU.
    CPU tensors (the interpreter) and meta tensors need no guard.
    """
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def capturing(t: torch.Tensor) -> bool:
    """Whether t's device is capturing a CUDA graph on the current stream: no host wait may
    happen then (it would invalidate the capture)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def on_inputs_device(fn):
    """Runs launcher `fn` under device_guard(the device of its tensor arguments).

    Tensor arguments on different devices are a ValueError naming them (the same check and
    message as the argument checks, made before anything is allocated or launched).
    """
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def launcher(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        tensors = {n: v for n, v in bound.arguments.items() if isinstance(v, torch.Tensor)}
        V._same_device(**tensors)
        device = next(iter(tensors.values())).device if tensors else None
        with device_guard(device):
            return fn(*args, **kwargs)

    return launcher
