"""vtkernels: fused kernels for visual-token pruning (FoPru, PruMerge, VisPruner) as torch.ops.vtk.*"""
from . import ops
from ._library import backend_of
from .ops import *  # noqa: F401,F403

__version__ = "0.1.0"
__all__ = list(ops.__all__) + ["backend_of", "extension_error", "ops", "reference"]


def __getattr__(name):
    if name == "extension_error":
        from . import _library
        return _library.extension_error
    raise AttributeError(name)
