"""Loads the compiled kernels and makes sure every vtk op exists on every backend.

Order of preference per dispatch key:
  CPU:  C++ kernel from vtkernels._C, else the reference kernel.
  CUDA: CUDA C++ kernel from vtkernels._C (selection ops), else the Triton kernel, else the
        reference kernel.
Importing never fails because the compiled library is missing or was built for another torch:
it warns once and falls back (set VTK_NO_EXTENSION=1 to skip the library on purpose, quietly).
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

from ._schemas import SCHEMAS

extension_error: str | None = None  # why vtkernels._C is not in use, or None when it is
_libs: list = []  # keeps the Python registrations alive


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _load_extension() -> str | None:
    if _truthy("VTK_NO_EXTENSION"):
        return "VTK_NO_EXTENSION is set"
    try:
        importlib.import_module("vtkernels._C")
    except Exception as e:  # missing, or built against another torch (undefined symbols)
        return f"{type(e).__name__}: {e}"
    return None


def has_op(name: str) -> bool:
    try:
        getattr(torch.ops.vtk, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def has_kernel(name: str, key: str) -> bool:
    return has_op(name) and torch._C._dispatch_has_kernel_for_dispatch_key(f"vtk::{name}", key)


def backend_of(name: str, key: str) -> str:
    """Which implementation serves op `name` on dispatch key `key`: 'compiled', 'triton' or 'reference'."""
    return _served.get((name, key), "compiled" if has_kernel(name, key) else "missing")


_served: dict = {}


def _triton_usable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def install(python_cpu: dict, python_cuda: dict) -> None:
    """Defines missing ops and fills missing CPU/CUDA kernels.

    python_cpu[name] is the fallback CPU kernel (the reference); python_cuda[name] is
    (triton_kernel or None, reference_kernel).
    """
    global extension_error
    extension_error = _load_extension()
    if extension_error is not None and not _truthy("VTK_NO_EXTENSION"):
        warnings.warn(
            "vtkernels: compiled kernels unavailable, falling back to the reference kernels "
            f"({extension_error}). Rebuild with `pip install --no-build-isolation .` for speed.",
            RuntimeWarning, stacklevel=3)
    lib = torch.library.Library("vtk", "FRAGMENT")
    _libs.append(lib)
    triton_ok = _triton_usable()
    for name, schema in SCHEMAS.items():
        if not has_op(name):
            lib.define(schema)
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"vtk::{name}", "CPU"):
            lib.impl(name, python_cpu[name], "CPU")
            _served[(name, "CPU")] = "reference"
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"vtk::{name}", "CUDA"):
            tri, ref = python_cuda[name]
            use = tri if (tri is not None and triton_ok) else ref
            lib.impl(name, use, "CUDA")
            _served[(name, "CUDA")] = "triton" if use is tri else "reference"
