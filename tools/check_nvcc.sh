#!/usr/bin/env bash
# Compiles every torch-free CUDA source (csrc/cuda/*.cu, those including no torch header) with nvcc
# for sm_80 and sm_90 (plus PTX for compute_90, which newer GPUs such as Blackwell JIT-compile), so
# that a machine without a GPU (or without a CUDA torch) still catches CUDA compile errors. The
# flags mirror the extension build (setup.py and torch's cpp_extension): fast math, and CUDA's half
# and bfloat16 operators hidden, as torch hides them. The torch glue (csrc/cuda/*.cpp) needs a CUDA
# torch and is built by setup.py only; here it gets a syntax check (g++ -fsyntax-only, templates
# instantiated) against the torch this machine has (PYTHON, default python3), with stub headers for
# the CUDA libraries a CPU wheel does not ship (cuBLAS, cuSPARSE, cuSOLVER handles and status types).
#
# Resources: ptxas -v reports each kernel's registers, stack frame (local memory) and spills per
# arch. Any kernel with a stack frame or spill stores / loads fails the check: these kernels are
# bandwidth kernels, and a spill is a round trip to local memory in the inner loop. The table of
# every kernel is printed.
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

# Keep in step with setup.py's default TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX") and CMakeLists.txt.
flags=(-gencode arch=compute_80,code=sm_80 -gencode "arch=compute_90,code=[sm_90,compute_90]" -std=c++17 -O3
       --use_fast_math --expt-relaxed-constexpr -DVTK_WITH_CUDA
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ -Xptxas -v)

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "check_nvcc: $("$nvcc" --version | tail -n 1)"
shopt -s nullglob
files=("$root"/csrc/cuda/*.cu)
if [ ${#files[@]} -eq 0 ]; then
  echo "check_nvcc: no csrc/cuda/*.cu files"
  exit 0
fi

# ptxas -v prints, per kernel and arch: "Compiling entry function 'NAME' for 'sm_XX'", then
# "N bytes stack frame, N bytes spill stores, N bytes spill loads", then "Used N registers, ...".
# Prints one line per kernel and arch; exits non-zero when a kernel has local memory or spills.
resources() {
  awk '
    /Compiling entry function/ {
      name = $0; sub(/.*entry function \047/, "", name); sub(/\047.*/, "", name)
      arch = $0; sub(/.* for \047/, "", arch); sub(/\047.*/, "", arch)
      # demangled, without namespaces and parameters: fopru_select_kernel<double>
      short = name
      if (demangle != "") {
        cmd = demangle " \047" name "\047"; cmd | getline short; close(cmd)
        gsub(/\(anonymous namespace\)/, "anon", short)
        sub(/\(.*/, "", short); sub(/.*::/, "", short)
      }
      next
    }
    /bytes stack frame/ {
      n = split($0, w, " ")
      for (i = 1; i <= n; i++) {
        if (w[i] == "stack") stack = w[i - 2] + 0
        if (w[i] == "spill" && w[i + 1] ~ /^stores/) st = w[i - 2] + 0
        if (w[i] == "spill" && w[i + 1] ~ /^loads/) ld = w[i - 2] + 0
      }
      next
    }
    /Used [0-9]+ registers/ {
      regs = $0; sub(/.*Used /, "", regs); sub(/ registers.*/, "", regs)
      lmem = 0; if ($0 ~ /bytes lmem/) { lmem = $0; sub(/ bytes lmem.*/, "", lmem); sub(/.* /, "", lmem); lmem += 0 }
      bad = (stack + st + ld + lmem) > 0
      printf "  %-5s %-6s %3s regs  stack %4d  spill st/ld %4d/%4d  %s\n", bad ? "BAD" : "ok", arch, regs, stack, st, ld, short
      if (bad) fail = 1
      kernels++
      stack = st = ld = 0
    }
    END { if (kernels == 0) { print "  no ptxas resource lines found"; exit 2 } exit fail }
  ' demangle="$(command -v c++filt || true)" "$1"
}

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
    echo "ok   $rel (sm_80, sm_90, compute_90 PTX; $((SECONDS - start)) s)"
    compiled=$((compiled + 1))
    if ! resources "$log"; then
      echo "FAIL $rel: a kernel uses local memory or spills registers (ptxas -v above)"
      failed=1
    fi
  else
    echo "FAIL $rel"
    sed 's/^/    /' "$log"
    failed=1
  fi
done

# The torch glue: a syntax check against this machine's torch headers (a CPU wheel ships ATen/cuda
# and c10/cuda, not the CUDA libraries' headers they include: stubs declare what they use).
glue=("$root"/csrc/cuda/*.cpp)
py="${PYTHON:-python3}"
torch_inc="$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))' 2>/dev/null)"
cuda_inc="$(dirname "$(dirname "$(readlink -f "$nvcc")")")/include"
[ -f "$cuda_inc/cuda_runtime.h" ] || cuda_inc="$(ls -d /usr/local/cuda*/include 2>/dev/null | head -n 1)"
if [ ${#glue[@]} -eq 0 ]; then
  :
elif [ -z "$torch_inc" ] || ! command -v g++ >/dev/null || [ ! -f "$cuda_inc/cuda_runtime.h" ]; then
  echo "skip csrc/cuda/*.cpp syntax check: needs torch (for $py), g++ and the CUDA runtime headers"
else
  stub="$tmp/stub"
  mkdir -p "$stub/c10/cuda/impl"
  printf '#pragma once\n' >"$stub/c10/cuda/impl/cuda_cmake_macros.h"
  printf '#pragma once\ntypedef struct cublasContext* cublasHandle_t;\ntypedef int cublasStatus_t;\n' >"$stub/cublas_v2.h"
  printf '#pragma once\ntypedef struct cublasLtContext* cublasLtHandle_t;\n' >"$stub/cublasLt.h"
  printf '#pragma once\ntypedef struct cusparseContext* cusparseHandle_t;\ntypedef int cusparseStatus_t;\ninline const char* cusparseGetErrorString(cusparseStatus_t) { return ""; }\n' >"$stub/cusparse.h"
  printf '#pragma once\ntypedef struct cusolverDnContext* cusolverDnHandle_t;\n' >"$stub/cusolverDn.h"
  printf '#pragma once\ntypedef int cusolverStatus_t;\n' >"$stub/cusolver_common.h"
  pyinc="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  tv="$("$py" -c 'import torch; print(torch.__version__)')"
  for f in "${glue[@]}"; do
    rel="${f#"$root"/}"
    log="$tmp/$(basename "$f").log"
    # -idirafter for the stubs: searched last, so real headers, where present, win.
    if g++ -std=c++20 -fsyntax-only -Wall -DVTK_WITH_CUDA -I"$torch_inc" -I"$torch_inc/torch/csrc/api/include" \
         -I"$cuda_inc" -idirafter "$stub" -I"$pyinc" "$f" >"$log" 2>&1; then
      echo "ok   $rel (g++ -fsyntax-only against torch $tv headers)"
    else
      echo "FAIL $rel (g++ -fsyntax-only against torch $tv headers)"
      sed 's/^/    /' "$log"
      failed=1
    fi
  done
fi

if [ $failed -ne 0 ]; then
  echo "check_nvcc: some CUDA sources do not compile, or spill"
  exit 1
fi
echo "check_nvcc: $compiled CUDA source(s) compile, no kernel spills or uses local memory"
