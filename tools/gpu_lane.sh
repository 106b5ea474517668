#!/usr/bin/env bash
# The GPU lane in one go, for a machine lent with a GPU for a few minutes: it must go straight
# through on the first try. Stages, each under its own time limit (and all under one deadline,
# VTK_LANE_BUDGET_S, default 450 s), each recorded, the next one run whatever the last gave:
#
#   preflight  GPU (nvidia-smi, torch.cuda), torch, CUDA, nvcc, ninja, Triton, transformers,
#              setuptools, pytest, pytest-benchmark; stops here, with one line saying why, when
#              torch or pytest is missing or there is no GPU
#   build      setup.py build_ext --inplace with this machine's python, for the visible GPU's arch
#              only (VTK_BUILD_CUDA=0 without nvcc: the Triton lane still runs); then which
#              backend serves each op
#   tests      pytest -m gpu, one process per test file (a CUDA fault poisons a process)
#   bench      the cases of benchmarks/gpu_lane_cases.txt (the issue's targets), op cases then the
#              end-to-end prefill; summaries, the targets table, the op table, a PNG
#   sanitizer  compute-sanitizer memcheck on part of test_cuda.py, if it exists and time is left
#
# OUTDIR gets: lane.log (everything), stages.tsv, preflight.txt, build.log, tests-FILE.{log,xml},
# bench-ops.json / bench-e2e.json (benchmarks/results/ format), targets.md, bench-table.md,
# speedup.png, sanitizer.log, summary.md (stages, test counts, targets: measured, pass/fail).
#
# Usage: tools/gpu_lane.sh [--dry-run | --rehearse] [--only tests|bench] OUTDIR
#   --dry-run (or DRY_RUN=1): the pre-flight only; exit 0 when it passes, also without a GPU.
#   --rehearse: every stage on a machine without a GPU (CPU-only build, the gpu tests skip, the
#     benchmarks on the CPU), to try the script itself; VTK_LANE_CASES=FILE then names cases that
#     exist on the CPU (the default list is the GPU's: B = 64 is not a CPU size).
#   --only tests / --only bench: preflight, build and that stage (make test-gpu / make bench).
#   PYTHON (default python3), VTK_LANE_BUDGET_S, CUDA_HOME / NVCC for the compiler, VTK_COMMIT
#   (the commit to record where the tree has no .git).
# Exit: 0 every stage passed; 1 a stage failed (see summary.md); 2 no GPU (without --dry-run);
# 3 the pre-flight found torch or a test module missing; 64 usage. Missed performance targets are
# reported in summary.md and do not change the exit code: the lane measures them.
set -u

usage() { echo "usage: tools/gpu_lane.sh [--dry-run | --rehearse] [--only tests|bench] OUTDIR"; }

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dry=0
case "${DRY_RUN:-0}" in 1 | true | yes | on) dry=1 ;; esac
only=""
out=""
rehearse=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --rehearse) rehearse=1 ;;
    --only) shift; only="${1:-}"
      case "$only" in tests | bench) ;; *) usage; exit 64 ;; esac ;;
    -h | --help) usage; exit 0 ;;
    -*) usage; exit 64 ;;
    *) [ -z "$out" ] || { usage; exit 64; }; out="$1" ;;
  esac
  shift
done
[ -n "$out" ] || { usage; exit 64; }
mkdir -p "$out" || { echo "gpu_lane: cannot create $out"; exit 64; }
out="$(cd "$out" && pwd)"

PY="${PYTHON:-python3}"
budget="${VTK_LANE_BUDGET_S:-450}"
start=$SECONDS
: >"$out/lane.log"
exec > >(tee -a "$out/lane.log") 2>&1
printf 'stage\tresult\tseconds\tnote\n' >"$out/stages.tsv"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # a GPU lane compiles Triton for real
failed=0

say() { echo "gpu_lane: $*"; }
record() {  # stage result seconds note
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >>"$out/stages.tsv"
  say "stage $1: $2 (${3} s)${4:+ - $4}"
}
left() { echo $((budget - (SECONDS - start))); }

# run_stage NAME CAP LOGFILE CMD...: CMD under `timeout`, at most CAP seconds and never past the
# deadline; its output goes to the lane log and LOGFILE. Returns CMD's status (124: timed out).
run_stage() {
  local name="$1" cap="$2" logf="$3" limit rc t0
  shift 3
  limit=$(left)
  [ "$limit" -gt "$cap" ] && limit=$cap
  if [ "$limit" -lt 15 ]; then
    record "$name" "SKIPPED" 0 "out of time (budget ${budget} s)"
    failed=1
    return 125
  fi
  t0=$SECONDS
  say "--- $name (limit ${limit} s): $*"
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$logf"
  rc=${PIPESTATUS[0]}
  LAST_SECONDS=$((SECONDS - t0))
  LAST_LIMIT=$limit
  return "$rc"
}

# summary.md (stages, test counts, targets, the op table), then exit with the given status.
finish() {
  if ! "$PY" - "$out" "$((SECONDS - start))" <<'PYEOF' 2>/dev/null
import glob, os, sys
import xml.etree.ElementTree as ET

out, total = sys.argv[1], sys.argv[2]
lines = [f"# GPU lane ({total} s)", "", "| stage | result | seconds | note |", "|---|---|---|---|"]
with open(os.path.join(out, "stages.tsv")) as f:
    for row in list(f)[1:]:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row.rstrip("\n").split("\t")) + " |")
xmls = sorted(glob.glob(os.path.join(out, "tests-*.xml")))
if xmls:
    lines += ["", "| test file | passed | failed | errors | skipped |", "|---|---|---|---|---|"]
    for x in xmls:
        try:
            s = ET.parse(x).getroot()
            s = s if s.tag == "testsuite" else s.find("testsuite")
            n, fl, er, sk = (int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
            lines.append(f"| {os.path.basename(x)[6:-4]} | {n - fl - er - sk} | {fl} | {er} | {sk} |")
        except Exception as e:  # a file cut short by a time limit
            lines.append(f"| {os.path.basename(x)[6:-4]} | ? ({type(e).__name__}) | | | |")
for name, title in (("targets.md", "Targets"), ("bench-table.md", "Benchmarks (vtk against the published path)")):
    p = os.path.join(out, name)
    if os.path.exists(p):
        lines += ["", f"## {title}", "", open(p).read().strip()]
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
  then  # no working python: the stage table alone
    { echo "# GPU lane ($((SECONDS - start)) s)"; echo; echo "| stage | result | seconds | note |"; echo "|---|---|---|---|"
      tail -n +2 "$out/stages.tsv" | awk -F '\t' '{ printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4 }'; } >"$out/summary.md"
    cat "$out/summary.md"
  fi
  say "summary: $out/summary.md"
  exit "$1"
}

# ---- preflight ---------------------------------------------------------------------------------
say "tools/gpu_lane.sh in $root -> $out (budget ${budget} s$([ $dry = 1 ] && echo ', dry run'))"
if [ -n "${VTK_COMMIT:-}" ]; then
  say "commit $VTK_COMMIT (VTK_COMMIT)"
else
  say "commit $(git -C "$root" rev-parse --short=12 HEAD 2>/dev/null || echo '? (no git here: set VTK_COMMIT)')$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo ' (with changes)')"
fi
{
  echo "== host: $(uname -srm), $(nproc) cores, $(free -g 2>/dev/null | awk '/Mem:/{print $2 " GiB"}')"
  echo "== nvidia-smi"
  if command -v nvidia-smi >/dev/null; then
    timeout 20 nvidia-smi --query-gpu=index,name,memory.total,driver_version,compute_cap --format=csv,noheader \
      || timeout 20 nvidia-smi -L || echo "nvidia-smi failed"
  else
    echo "nvidia-smi: not found"
  fi
  nvcc="${NVCC:-$(command -v nvcc || true)}"
  [ -z "$nvcc" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] && nvcc="$CUDA_HOME/bin/nvcc"
  [ -z "$nvcc" ] && [ -x /usr/local/cuda/bin/nvcc ] && nvcc=/usr/local/cuda/bin/nvcc
  echo "== nvcc: ${nvcc:-not found}${nvcc:+ ($("$nvcc" --version 2>/dev/null | tail -n 1))}"
  echo "== ninja: $(command -v ninja >/dev/null && ninja --version || echo 'not found (the build compiles one file at a time)')"
  echo "== python: $(command -v "$PY" || echo "$PY: not found")"
} | tee "$out/preflight.txt"
nvcc="${NVCC:-$(command -v nvcc || true)}"
[ -z "$nvcc" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] && nvcc="$CUDA_HOME/bin/nvcc"
[ -z "$nvcc" ] && [ -x /usr/local/cuda/bin/nvcc ] && nvcc=/usr/local/cuda/bin/nvcc
if [ -n "$nvcc" ] && [ -z "${CUDA_HOME:-}" ]; then export CUDA_HOME="$(dirname "$(dirname "$nvcc")")"; fi

if ! command -v "$PY" >/dev/null; then
  say "FATAL: no python ($PY); set PYTHON"
  record preflight FATAL $((SECONDS - start)) "no python"
  finish 3
fi
# One python run: versions, the GPUs, and KEY=value lines for this script (preflight.env).
timeout 90 "$PY" - "$out/preflight.env" <<'PYEOF' 2>&1 | tee -a "$out/preflight.txt"
import importlib, shlex, sys

env = {}
def version(name):
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # missing, or broken (an ImportError of its own)
        return None, f"{type(e).__name__}: {e}"
    return getattr(mod, "__version__", "?"), None

print(f"== python {sys.version.split()[0]} ({sys.executable})")
missing = []
for name, label, role in (("torch", "torch", "required"), ("pytest", "pytest", "required"),
                          ("pytest_benchmark", "pytest-benchmark", "bench stage"),
                          ("triton", "triton", "Triton kernels (scoring ops, PruMerge, VisPruner)"),
                          ("transformers", "transformers", "end-to-end benchmark, test_hf"),
                          ("setuptools", "setuptools", "build"), ("numpy", "numpy", "tests"),
                          ("matplotlib", "matplotlib", "speed-up plot (optional)")):
    v, err = version(name)
    print(f"== {label}: {v if v else 'MISSING (' + err + ')'}{'' if v else '  <- ' + role}")
    env["HAVE_" + name.upper()] = "1" if v else "0"
    if not v and role == "required":
        missing.append(label)
env["MISSING"] = " ".join(missing)
if env["HAVE_TORCH"] == "1":
    import torch
    env["TORCH_CUDA"] = torch.version.cuda or ""
    print(f"== torch.version.cuda: {torch.version.cuda}, cuDNN: {torch.backends.cudnn.version() if torch.version.cuda else None}")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env["GPU_COUNT"] = str(n)
    caps = []
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        caps.append(f"{p.major}.{p.minor}")
        print(f"== cuda:{i}: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
              f"{p.total_memory / 2**30:.1f} GiB")
    env["ARCH_LIST"] = ";".join(sorted(set(caps)))
    if n:
        x = torch.ones(1 << 20, device="cuda")  # the context comes up and a kernel runs
        torch.cuda.synchronize()
        print(f"== a CUDA kernel ran: sum = {float(x.sum()):.0f}")
with open(sys.argv[1], "w") as f:
    for k, v in env.items():
        f.write(f"{k}={shlex.quote(v)}\n")
PYEOF
pf=${PIPESTATUS[0]}
if [ "$pf" -ne 0 ] || [ ! -f "$out/preflight.env" ]; then
  say "FATAL: the pre-flight python failed (exit $pf; see preflight.txt): torch or CUDA does not come up"
  record preflight FATAL $((SECONDS - start)) "python pre-flight exit $pf"
  finish 3
fi
# shellcheck disable=SC1091
. "$out/preflight.env"
if [ -n "$MISSING" ]; then
  say "FATAL: missing Python module(s) for $PY: $MISSING (no venv here: install them into this python)"
  record preflight FATAL $((SECONDS - start)) "missing: $MISSING"
  finish 3
fi
if [ "$HAVE_PYTEST_BENCHMARK" != 1 ] && [ "$only" = bench ]; then
  say "FATAL: missing Python module pytest-benchmark: the bench stage cannot run"
  record preflight FATAL $((SECONDS - start)) "missing: pytest-benchmark"
  finish 3
fi
if [ "${GPU_COUNT:-0}" -eq 0 ] && [ $rehearse = 1 ]; then
  say "rehearsal: no GPU needed; CPU-only build, benchmarks on the CPU"
  ARCH_LIST="" nvcc=""
elif [ "${GPU_COUNT:-0}" -eq 0 ]; then
  if [ -z "${TORCH_CUDA:-}" ]; then why="torch is a CPU build (torch.version.cuda is None)"; else why="torch (CUDA $TORCH_CUDA) sees no device"; fi
  say "no CUDA device: $why; stopping after the pre-flight"
  record preflight "no GPU" $((SECONDS - start)) "$why"
  if [ $dry = 1 ]; then
    say "dry run: pre-flight done (exit 0)"
    finish 0
  fi
  finish 2
fi
arch="${ARCH_LIST}"
build_cuda=1
if [ -z "$nvcc" ] && [ $rehearse = 0 ]; then
  build_cuda=0
  say "no nvcc: building the C++ CPU kernels only (VTK_BUILD_CUDA=0); the Triton lane still runs"
fi
[ $rehearse = 1 ] && build_cuda=0
jobs=$(nproc)
record preflight ok $((SECONDS - start)) "GPUs: $GPU_COUNT, arch $arch, nvcc: ${nvcc:-none}"
build_cmd=(env VTK_BUILD_CUDA=$build_cuda TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$jobs" "$PY" setup.py build_ext --inplace)
if [ $dry = 1 ]; then
  say "dry run: would run: (cd $root && ${build_cmd[*]}), then pytest -m gpu per test file, then the benchmarks of benchmarks/gpu_lane_cases.txt"
  finish 0
fi

# ---- build -------------------------------------------------------------------------------------
cd "$root" || finish 1
run_stage build 240 "$out/build.log" "${build_cmd[@]}"
rc=$?
if [ $rc -eq 0 ]; then
  VTK_LANE_BUILT_CUDA=$build_cuda "$PY" - <<'PYEOF' 2>&1 | tee -a "$out/build.log"
import os
import vtkernels
from vtkernels import ops
print("vtkernels from", vtkernels.__file__, "| extension_error:", vtkernels.extension_error)
print("backends on CUDA:", ", ".join(f"{n}={vtkernels.backend_of(n, 'CUDA')}" for n in ops.__all__))
ok = vtkernels.extension_error is None
if os.environ["VTK_LANE_BUILT_CUDA"] == "1":  # the CUDA C++ kernels must serve the selection ops
    ok = ok and all(vtkernels.backend_of(n, "CUDA") == "compiled" for n in ("topk_indices", "gather_tokens", "fopru_select"))
raise SystemExit(0 if ok else 1)
PYEOF
  rc=${PIPESTATUS[0]}
  if [ $rc -ne 0 ]; then
    record build FAIL "$LAST_SECONDS" "built, but vtkernels._C does not load or lacks its CUDA kernels (build.log)"
    failed=1
  else
    record build ok "$LAST_SECONDS" "VTK_BUILD_CUDA=$build_cuda, arch $arch, $jobs jobs"
  fi
else
  [ $rc -ne 125 ] && record build "$([ $rc -eq 124 ] && echo TIMEOUT || echo FAIL)" "$LAST_SECONDS" \
    "exit $rc; the tests run on the fallbacks (Triton, reference)"
  failed=1
fi

# ---- tests -------------------------------------------------------------------------------------
if [ "$only" != bench ]; then
  # The files with GPU tests, the CUDA C++ kernels first; then any other file that marks gpu.
  files=(test_cuda.py test_triton.py test_prune.py test_hf.py)
  for f in "$root"/python_tests/test_*.py; do
    b="$(basename "$f")"
    case " ${files[*]} " in *" $b "*) ;; *) grep -q "mark.gpu" "$f" && files+=("$b") ;; esac
  done
  tests_end=$((SECONDS + 210))  # the whole test stage
  for b in "${files[@]}"; do
    [ -f "$root/python_tests/$b" ] || continue
    cap=$((tests_end - SECONDS))
    [ $cap -gt 120 ] && cap=120
    name="tests:${b%.py}"
    run_stage "$name" "$cap" "$out/tests-${b%.py}.log" "$PY" -m pytest "python_tests/$b" -m gpu -q \
      -p no:cacheprovider -rfE --durations=5 --junitxml="$out/tests-${b%.py}.xml"
    rc=$?
    case $rc in
      0) record "$name" ok "$LAST_SECONDS" "$(tail -n 1 "$out/tests-${b%.py}.log")" ;;
      5) record "$name" ok "$LAST_SECONDS" "no gpu tests collected" ;;
      124 | 137) record "$name" TIMEOUT "$LAST_SECONDS" "limit $LAST_LIMIT s"; failed=1 ;;
      125) ;;
      *) record "$name" FAIL "$LAST_SECONDS" "$(tail -n 1 "$out/tests-${b%.py}.log")"; failed=1 ;;
    esac
  done
fi

# ---- bench -------------------------------------------------------------------------------------
if [ "$only" != tests ]; then
  if [ "$HAVE_PYTEST_BENCHMARK" != 1 ]; then
    say "MISSING pytest-benchmark for $PY: the bench stage cannot run"
    record bench FAIL 0 "missing pytest-benchmark"
    failed=1
  else
    mapfile -t cases < <(grep -v '^[[:space:]]*\(#\|$\)' "${VTK_LANE_CASES:-$root/benchmarks/gpu_lane_cases.txt}")
    ops_cases=() e2e_cases=()
    for c in "${cases[@]}"; do
      case "$c" in *test_bench_e2e.py*) e2e_cases+=("$c") ;; *) ops_cases+=("$c") ;; esac
    done
    timing=(--benchmark --benchmark-max-time=0.5 --benchmark-min-rounds=5 --benchmark-warmup=on
            --benchmark-warmup-iterations=2 -q -p no:cacheprovider -rfE)
    [ $rehearse = 1 ] && timing+=(--bench-device cpu)
    for part in ops e2e; do
      if [ $part = ops ]; then sel=("${ops_cases[@]}"); cap=150; else sel=("${e2e_cases[@]}"); cap=150; fi
      [ ${#sel[@]} -gt 0 ] || continue
      run_stage "bench:$part" "$cap" "$out/bench-$part.log" "$PY" -m pytest "${sel[@]}" "${timing[@]}" \
        --vtk-summary "$out/bench-$part.json"
      rc=$?
      case $rc in
        0) record "bench:$part" ok "$LAST_SECONDS" "$(tail -n 1 "$out/bench-$part.log")" ;;
        124 | 137) record "bench:$part" TIMEOUT "$LAST_SECONDS" "limit $LAST_LIMIT s (cases done so far are kept)"; failed=1 ;;
        125) ;;
        *) record "bench:$part" FAIL "$LAST_SECONDS" "$(tail -n 1 "$out/bench-$part.log")"; failed=1 ;;
      esac
    done
    sums=()
    for s in "$out/bench-ops.json" "$out/bench-e2e.json"; do [ -s "$s" ] && sums+=("$s"); done
    if [ ${#sums[@]} -gt 0 ]; then
      "$PY" tools/bench_table.py --targets "${sums[@]}" >"$out/targets.md" 2>&1
      "$PY" tools/bench_table.py "${sums[@]}" >"$out/bench-table.md" 2>&1
      [ "$HAVE_MATPLOTLIB" = 1 ] && "$PY" tools/bench_table.py --png "$out/speedup.png" "${sums[@]}" >/dev/null 2>&1
      cat "$out/targets.md"
    fi
  fi
fi

# ---- sanitizer (optional, last) ----------------------------------------------------------------
if [ -z "$only" ]; then
  san="$(command -v compute-sanitizer || true)"
  [ -z "$san" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/compute-sanitizer" ] && san="$CUDA_HOME/bin/compute-sanitizer"
  if [ -z "$san" ]; then
    record sanitizer "not run" 0 "compute-sanitizer not found"
  elif [ "$(left)" -lt 60 ]; then
    record sanitizer "not run" 0 "under 60 s of the budget left"
  else
    run_stage sanitizer 150 "$out/sanitizer.log" "$san" --tool memcheck --error-exitcode 99 --print-limit 20 \
      "$PY" -m pytest python_tests/test_cuda.py -m gpu -q -p no:cacheprovider -x \
      -k "(gather or fopru_select or topk) and not 50000 and not 2880 and not compile"
    rc=$?
    case $rc in
      0) record sanitizer ok "$LAST_SECONDS" "memcheck: no errors" ;;
      124 | 137) record sanitizer "not finished" "$LAST_SECONDS" "limit $LAST_LIMIT s (optional stage)" ;;
      125) ;;
      99) record sanitizer FAIL "$LAST_SECONDS" "memcheck found errors (sanitizer.log)"; failed=1 ;;
      *) record sanitizer FAIL "$LAST_SECONDS" "exit $rc (sanitizer.log)"; failed=1 ;;
    esac
  fi
fi

say "done in $((SECONDS - start)) s; $([ $failed = 0 ] && echo 'every stage passed' || echo 'some stage failed')"
finish $failed
