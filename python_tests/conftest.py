import os

# Triton kernels run under the interpreter (on CPU tensors) when there is no GPU. This must
# happen before any @triton.jit kernel is defined, i.e. before test modules import
# vtkernels.triton.*; on a CUDA machine the real compiler stays in use.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    """On a CUDA machine (Triton compiling for real), the gpu mark also goes to the tests that run
    on the GPU there without carrying it: every test of test_triton.py (its kernels then run on
    CUDA tensors) and the "triton" and "cuda" backends of test_prune.py. The GPU lane runs
    `pytest -m gpu`, which then selects them all."""
    import pytest
    import torch

    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0"):
        return
    for item in items:
        module = os.path.basename(str(getattr(item, "path", None) or item.fspath))  # .path: pytest >= 7
        params = getattr(getattr(item, "callspec", None), "params", {})
        if module == "test_triton.py" or (module == "test_prune.py" and params.get("bk") in ("triton", "cuda")):
            item.add_marker(pytest.mark.gpu)
