"""The project's own tools: tools/check_nvcc.sh (CUDA compile and resource check),
tools/gpu_lane.sh (the GPU lane; here only its dry run, on a machine without a GPU) and the GPU
lane's benchmark list."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nvcc():
    found = os.environ.get("NVCC") or shutil.which("nvcc")
    if not found and os.path.exists("/usr/local/cuda/bin/nvcc"):
        found = "/usr/local/cuda/bin/nvcc"
    return found


@pytest.mark.skipif(_nvcc() is None, reason="no nvcc: tools/check_nvcc.sh skips too")
def test_check_nvcc_fails_on_local_memory(tmp_path):
    """The resource check is not blind: a kernel with a local array indexed at run time (a stack
    frame) fails it, and the table names the kernel."""
    (tmp_path / "tools").mkdir()
    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "tools", "check_nvcc.sh"), tmp_path / "tools")
    (tmp_path / "csrc" / "cuda" / "local.cu").write_text(
        "__global__ void local_array_kernel(const float* x, float* y, int n) {\n"
        "  float a[64];\n"
        "  for (int i = 0; i < 64; ++i) a[i] = x[(threadIdx.x * 64 + i * 7) % n];\n"
        "  y[threadIdx.x] = a[(threadIdx.x * 13) & 63];\n"
        "}\n")
    r = subprocess.run(["bash", str(tmp_path / "tools" / "check_nvcc.sh")], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, NVCC=_nvcc()))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "BAD" in r.stdout and "local_array_kernel" in r.stdout and "spills" in r.stdout, r.stdout


def _lane(tmp_path, *args, **env):
    r = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_lane.sh"), *args], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, PYTHON=sys.executable, **env), cwd=tmp_path)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path: on a GPU machine the lane runs for real")
def test_gpu_lane_dry_run_without_gpu(tmp_path):
    """Without a GPU the lane stops after its pre-flight with one clear line: exit 0 as a dry run
    (flag or DRY_RUN=1), non-zero otherwise; the log, the stage table and summary.md are written."""
    rc, text = _lane(tmp_path, "--dry-run", str(tmp_path / "a"))
    assert rc == 0, text
    assert "gpu_lane: no CUDA device: torch is a CPU build" in text and "stopping after the pre-flight" in text
    assert "== torch: " + torch.__version__ in text and "== pytest: " in text  # the versions are printed
    for name in ("lane.log", "preflight.txt", "stages.tsv", "summary.md"):
        assert (tmp_path / "a" / name).exists(), name
    assert "| preflight | no GPU |" in (tmp_path / "a" / "summary.md").read_text()
    rc, text = _lane(tmp_path, str(tmp_path / "b"), DRY_RUN="1")
    assert rc == 0 and "no CUDA device" in text, text
    rc, text = _lane(tmp_path, str(tmp_path / "c"))
    assert rc == 2 and "no CUDA device" in text and "dry run" not in text, text


def test_gpu_lane_names_a_missing_test_module(tmp_path):
    """A python without pytest: the pre-flight fails at once and says which module is missing."""
    hidden = tmp_path / "hide" / "pytest"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    rc, text = _lane(tmp_path, "--dry-run", str(tmp_path / "out"),
                     PYTHONPATH=str(tmp_path / "hide") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    assert rc == 3, text
    fatal = [line for line in text.splitlines() if line.startswith("gpu_lane: FATAL")]
    assert len(fatal) == 1, text
    assert fatal[0].startswith(f"gpu_lane: FATAL: missing Python module(s) for {sys.executable}: pytest ("), fatal
    assert "no CUDA device" not in text  # it stops before looking for a GPU


def test_gpu_lane_usage(tmp_path):
    rc, text = _lane(tmp_path)
    assert rc == 64 and "usage: tools/gpu_lane.sh" in text
    rc, text = _lane(tmp_path, "--only", "everything", str(tmp_path / "x"))
    assert rc == 64


def test_gpu_lane_cases_exist():
    """Every case the GPU lane benchmarks (benchmarks/gpu_lane_cases.txt) is a real node id at the
    GPU's sizes (--benchmark on CUDA: B = 1, 8, 64), and the list holds what the targets need."""
    path = os.path.join(ROOT, "benchmarks", "gpu_lane_cases.txt")
    cases = [line.strip() for line in open(path) if line.strip() and not line.startswith("#")]
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                        "--benchmark", "--bench-device", "cuda", *cases], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    collected = {line for line in r.stdout.splitlines() if "::" in line}
    assert collected == set(cases), set(cases) ^ collected
    needed = ["test_copy_bandwidth", "test_scoring[B64-cls_attention-vtk-llava15]",
              "test_scoring[B8-fopru_significance-published-llava15]", "test_vispruner[B1-published-llava15]",
              "test_prumerge[B1-prumerge-published-llava15]", "test_prefill[B1-vispruner-64]",
              "test_prefill[B1-unpruned]", "test_scoring[B1-cls_attention-vtk-llava15]"]
    for n in needed:
        assert any(c.endswith("::" + n) for c in cases), n
