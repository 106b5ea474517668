"""vLLM plugin: fixed-budget visual-token pruning inside vLLM's own LLaVA-1.5 and Qwen2.5-VL.

``pip install vtkernels[vllm]`` installs the entry point ``vtkernels = "vtkernels.vllm:register"``
in vLLM's ``vllm.general_plugins`` group; vLLM calls :func:`register` in every process it starts.
A model is then served pruned by choosing the architecture and the method in ``hf_overrides``::

    LLM(model=DIR, hf_overrides={"architectures": ["VtkLlavaForConditionalGeneration"],
                                 "vtk_pruning": {"method": "vispruner", "keep": 64}})

(Qwen2.5-VL: ``VtkQwen2_5_VLForConditionalGeneration``.) See docs/vllm.md.

Nothing here imports vLLM's model code at import time: :func:`register` passes "module:Class"
strings, which vLLM imports lazily (in a subprocess the first time, to inspect the class), so no
CUDA is initialised by loading the plugin. ``vtkernels.hf`` never imports this package.
"""
from __future__ import annotations

from .options import ADAPTIVE_METHODS, METHODS, PruningOptions, parse_options

__all__ = ["ARCHITECTURES", "ADAPTIVE_METHODS", "METHODS", "PruningOptions", "parse_options", "register"]

# architecture name (as given in hf_overrides) -> "module:Class" for vLLM's lazy registry
ARCHITECTURES = {
    "VtkLlavaForConditionalGeneration": "vtkernels.vllm.llava:VtkLlavaForConditionalGeneration",
    "VtkQwen2_5_VLForConditionalGeneration":
        "vtkernels.vllm.qwen2_5_vl:VtkQwen2_5_VLForConditionalGeneration",
}


def register() -> None:
    """Registers the pruned architectures with vLLM's ModelRegistry (idempotent: vLLM may load
    plugins more than once per process, and once in each of its processes)."""
    from vllm import ModelRegistry

    for arch, target in ARCHITECTURES.items():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, target)
