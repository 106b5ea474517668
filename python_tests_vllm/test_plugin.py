"""The plugin as vLLM finds it: entry point, lazy registration, and the vtkernels it runs."""
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin tests need vllm (make test-vllm)")

ARCHS = {"VtkLlavaForConditionalGeneration": "LlavaForConditionalGeneration",
         "VtkQwen2_5_VLForConditionalGeneration": "Qwen2_5_VLForConditionalGeneration"}


def test_entry_point_is_in_vllms_plugin_group():
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "vtkernels"]
    assert len(eps) == 1
    assert eps[0].value == "vtkernels.vllm:register"


def test_vllm_loads_the_plugin_and_registers_lazily():
    """In a fresh interpreter, as a vLLM process starts: vLLM's plugin loader calls register(),
    the architectures resolve, and no model module (ours or vLLM's) has been imported."""
    code = textwrap.dedent("""
        import sys
        from vllm.plugins import load_general_plugins
        from vllm import ModelRegistry
        load_general_plugins()
        archs = set(ModelRegistry.get_supported_archs())
        print(sorted(a for a in archs if a.startswith("Vtk")))
        loaded = sorted(m for m in sys.modules if m.startswith(("vtkernels.vllm.llava",
                        "vtkernels.vllm.qwen", "vllm.model_executor.models.llava",
                        "vllm.model_executor.models.qwen2_5_vl")))
        print(loaded)
        load_general_plugins()  # vLLM may call it again: idempotent
    """)
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == str(sorted(ARCHS))
    assert lines[-1] == "[]"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_registered_classes_are_vllms_own_subclassed(arch):
    from vllm import ModelRegistry

    import vtkernels.vllm
    vtkernels.vllm.register()
    cls = ModelRegistry._try_load_model_cls(arch)
    base = ModelRegistry._try_load_model_cls(ARCHS[arch])
    assert cls is not None and base is not None
    assert issubclass(cls, base) and cls is not base
    assert cls.__module__.startswith("vtkernels.vllm.")


def test_vtkernels_runs_its_compiled_kernels_here():
    """vtkernels was built against this venv's torch (not the main venv's): the pruning ops run
    the C++ CPU kernels, not the reference fallback."""
    import vtkernels
    assert vtkernels.extension_error is None, vtkernels.extension_error
    for op in ("cls_attention", "fopru_significance", "fopru_select", "vispruner_select"):
        assert vtkernels.backend_of(op, "CPU") == "compiled", op


def test_hf_adapter_never_imports_the_plugin():
    code = "import sys, vtkernels.hf; print([m for m in sys.modules if m.startswith('vtkernels.vllm') or m == 'vllm'])"
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
