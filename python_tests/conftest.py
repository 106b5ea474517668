import os

# Triton kernels run under the interpreter (on CPU tensors) when there is no GPU. This must
# happen before any @triton.jit kernel is defined, i.e. before test modules import
# vtkernels.triton.*; on a CUDA machine the real compiler stays in use.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
