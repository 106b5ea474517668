#!/usr/bin/env bash
# Compiles every torch-free CUDA source (csrc/cuda/*.cu, those including no torch header) with nvcc for sm_80 and sm_90, so that a
# machine without a GPU (or without a CUDA torch) still catches CUDA compile errors. The flags
# mirror the extension build (setup.py and torch's cpp_extension): fast math, and CUDA's half and
# bfloat16 operators hidden, as torch hides them. The torch glue (csrc/cuda/*.cpp) needs a CUDA
# torch and is built by setup.py only.
#
# Usage: tools/check_nvcc.sh   (NVCC=/path/to/nvcc to pick a compiler)
set -u

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nvcc="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$nvcc" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then nvcc="$CUDA_HOME/bin/nvcc"; fi
if [ -z "$nvcc" ] && [ -x /usr/local/cuda/bin/nvcc ]; then nvcc=/usr/local/cuda/bin/nvcc; fi
if [ -z "$nvcc" ] || [ ! -x "$nvcc" ]; then
  echo "check_nvcc: nvcc not found, skipping"
  exit 0
fi

flags=(-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 -std=c++17 -O3
       --use_fast_math --expt-relaxed-constexpr -DVTK_WITH_CUDA
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "check_nvcc: $("$nvcc" --version | tail -n 1)"
shopt -s nullglob
files=("$root"/csrc/cuda/*.cu)
if [ ${#files[@]} -eq 0 ]; then
  echo "check_nvcc: no csrc/cuda/*.cu files"
  exit 0
fi

failed=0
compiled=0
for f in "${files[@]}"; do
  rel="${f#"$root"/}"
  if grep -Eq '^[[:space:]]*#[[:space:]]*include[[:space:]]*[<"](torch|ATen|c10)/' "$f"; then
    # Needs torch's headers (a CUDA torch): only setup.py can build it.
    echo "skip $rel: includes torch headers, built by setup.py only"
    continue
  fi
  log="$tmp/$(basename "$f").log"
  start=$SECONDS
  if "$nvcc" "${flags[@]}" -c "$f" -o "$tmp/$(basename "$f").o" >"$log" 2>&1; then
    echo "ok   $rel (sm_80, sm_90; $((SECONDS - start)) s)"
    compiled=$((compiled + 1))
  else
    echo "FAIL $rel"
    sed 's/^/    /' "$log"
    failed=1
  fi
done

if [ $failed -ne 0 ]; then
  echo "check_nvcc: some CUDA sources do not compile"
  exit 1
fi
echo "check_nvcc: $compiled CUDA source(s) compile"
