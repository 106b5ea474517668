#!/usr/bin/env bash
# GPU check of the vLLM plugin (docs/vllm.md): tiny random LLaVA-1.5 and Qwen2.5-VL models are
# served pruned through vllm.LLM and compared with transformers on the same weights (prompt,
# prompt log-probabilities, greedy tokens), for fopru_rank, fopru_row and vispruner.
#
# Needs: a CUDA GPU, and a Python (PYTHON, default python3) with vllm >= 0.33 and vtkernels
# installed against vLLM's torch, e.g.  pip install --no-build-isolation '.[vllm]'
# Usage:  tools/vllm_gpu.sh [--models llava,qwen] [--keep 24] [--dtype float32|bfloat16] [--eager]
# Exit status: 0 all checks passed, 1 a check failed, 2 the machine cannot run it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "vllm_gpu: no NVIDIA GPU here (nvidia-smi finds none); this check serves models with vLLM on a GPU." >&2
  echo "vllm_gpu: the CPU side of the plugin is tested by 'make test-vllm'." >&2
  exit 2
fi
if ! "$PYTHON" -c "import vllm, vtkernels.vllm" >/dev/null 2>&1; then
  echo "vllm_gpu: $PYTHON cannot import vllm and vtkernels.vllm; install both into it first:" >&2
  echo "  $PYTHON -m pip install 'vllm>=0.33' && $PYTHON -m pip install --no-build-isolation '.[vllm]'" >&2
  exit 2
fi
if ! "$PYTHON" -c "import vtkernels, sys; sys.exit(vtkernels.extension_error is not None)" 2>/dev/null; then
  echo "vllm_gpu: warning: vtkernels' compiled kernels do not load with this torch; the reference kernels will run" >&2
fi
# -P: the checkout stays off sys.path, so the installed vtkernels (built for vLLM's torch) is used.
exec "$PYTHON" -P tools/vllm_gpu_check.py "$@"
