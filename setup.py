"""Build of vtkernels: the C++ CPU kernels always, the CUDA kernels when possible.

Knobs (environment):
  VTK_NO_EXTENSION=1   install without compiling; ops run on the reference kernels
  VTK_BUILD_CUDA=1/0   force / skip the CUDA build (default: when torch has CUDA and nvcc exists)
  TORCH_CUDA_ARCH_LIST arches for nvcc (default "8.0;9.0+PTX": SASS for A100 and H100/H200, and
                       PTX for compute_90, which newer GPUs (Blackwell) compile at load time)
  MAX_JOBS             parallel compile jobs (torch's cpp_extension)
Build against your installed torch: pip install --no-build-isolation .
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    v = os.environ.get(name)
    return None if v is None else v.strip().lower() not in ("", "0", "false", "no", "off")


def _extensions():
    if _flag("VTK_NO_EXTENSION"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

    build_cuda = _flag("VTK_BUILD_CUDA")
    if build_cuda is None:
        build_cuda = torch.version.cuda is not None and (CUDA_HOME is not None or shutil.which("nvcc"))
    # Keep in step with tools/check_nvcc.sh and CMakeLists.txt.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # No -std flag: torch's BuildExtension picks the standard its headers need.
    cxx = ["-O3"]
    link = []
    if sys.platform.startswith("linux") and "parallel backend: OpenMP" in torch.__config__.parallel_info():
        # at::parallel_for is an inline template: without -fopenmp it compiles to a plain loop in
        # this library (ATen defines INTRA_OP_PARALLEL only under _OPENMP), and every CPU kernel
        # would run on one thread. The OpenMP runtime at load time is the libgomp torch has
        # already loaded (same soname).
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if build_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        ext = CUDAExtension(
            "vtkernels._C", sources,
            extra_compile_args={"cxx": cxx + ["-DVTK_WITH_CUDA"],
                                "nvcc": ["-O3", "-DVTK_WITH_CUDA", "--use_fast_math"]},
            extra_link_args=link, py_limited_api=True)
    else:
        ext = CppExtension("vtkernels._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link,
                           py_limited_api=True)
    return [ext], {"build_ext": BuildExtension}


def _license():
    """The license, in the form this setuptools takes (pyproject.toml declares it dynamic)."""
    import setuptools
    try:
        major = int(setuptools.__version__.split(".")[0])
    except ValueError:
        major = 0
    # PEP 639's License-Expression from setuptools 77 on; the older License field before.
    return {"license_expression": "Apache-2.0"} if major >= 77 else {"license": "Apache-2.0"}


ext_modules, cmdclass = _extensions()
setup(
    **_license(),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
