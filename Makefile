# vtkernels: set-up, tests, demo and benchmarks.
#   make demo      create .venv, install, build, run `vtk demo`
#   make test      the same set-up, then every test (no GPU needed)
#   make test-gpu  GPU lane, on a machine with CUDA: tools/gpu_lane.sh --only tests (that machine's
#                  python3, no venv: pre-flight, in-place build for the visible GPU, pytest -m gpu)
#   make bench     GPU benchmarks (tools/gpu_lane.sh --only bench), summaries into benchmarks/results/
#   make bench-cpu the CPU benchmarks of README (2-core machine), summaries into benchmarks/results/
#   make test-vllm the vLLM plugin on the CPU, in its own venv .venv-vllm (vLLM pins its own torch)
#   make test-triton-compile  every Triton kernel compiled for sm_80/sm_90 (no GPU needed)
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
TF_OLD ?= 5.17.0
# The Triton the GPU machines run (the venv has a newer one).
TRITON_GPU ?= 3.6.0
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-installed
JOBS ?= 2

.PHONY: all venv build test test-cpu test-hf-old test-triton-compile test-triton-compile-venv check-nvcc check-setuptools demo test-gpu bench bench-cpu clean test-vllm

all: test

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(VPY) pyproject.toml Makefile
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==$(TORCH_VERSION)
	$(VPY) -m pip install -q setuptools wheel ninja numpy pillow pytest pytest-benchmark expecttest "triton>=3.6" "transformers>=5.0" matplotlib
	touch $(STAMP)

venv: $(STAMP)

# Editable install, so the compiled vtkernels/_C*.so lands in the source tree.
build: $(STAMP)
	MAX_JOBS=$(JOBS) $(VPY) -m pip install -q --no-build-isolation --no-deps -e .

# nvcc for every torch-free .cu (sm_80, sm_90, PTX; no spills, no local memory), and a syntax
# check of the torch glue against the venv's torch headers.
check-nvcc: $(STAMP)
	PYTHON=$(VPY) tools/check_nvcc.sh

# pyproject.toml allows setuptools >= 64: its metadata must read with the oldest (and with 65,
# common on GPU images), in throwaway venvs cached under .venv/ (no torch, no compile).
OLD_SETUPTOOLS ?= 64.0.0 65.7.0
check-setuptools:
	PYTHON=$(PYTHON) tools/check_setuptools.sh $(OLD_SETUPTOOLS)

# The compile check needs the real Triton compiler, not the interpreter: test-triton-compile runs it.
test-cpu: build
	TRITON_INTERPRET=1 $(VPY) -m pytest python_tests benchmarks -q -p no:cacheprovider \
	  --ignore=python_tests/test_triton_compile.py

# The Hugging Face integration against the oldest supported transformers (what the GPU machines run).
$(VENV)/tf-old/.stamp: $(STAMP)
	# transformers 5.17 wants huggingface_hub < 2 (and its httpx client): kept beside it, not in the venv.
	$(VPY) -m pip install -q --no-deps --target $(VENV)/tf-old transformers==$(TF_OLD) \
	  "huggingface_hub>=1.5,<2" httpx httpcore certifi
	touch $@

test-hf-old: build $(VENV)/tf-old/.stamp
	PYTHONPATH=$(VENV)/tf-old TRITON_INTERPRET=1 $(VPY) -m pytest -q -p no:cacheprovider \
	  python_tests/test_hf.py python_tests/test_hf_qwen.py python_tests/test_flops.py python_tests/test_cli.py \
	  python_tests/test_glimpse.py python_tests/test_glimpse_train.py python_tests/test_glimpse_train_qwen.py

# Triton as the GPU machines run it, kept beside the venv (like transformers $(TF_OLD)).
$(VENV)/triton36/.stamp: $(STAMP)
	$(VPY) -m pip install -q --no-deps --target $(VENV)/triton36 triton==$(TRITON_GPU)
	touch $@

# Every Triton kernel compiled (no GPU, no CUDA driver: Triton's own ptxas) for sm_80 and sm_90 at
# the configurations its launchers choose at real shapes; fails on a compile error, shared memory
# over the limit or a register spill. With the GPU machines' Triton (about a minute on 2 cores).
test-triton-compile: build $(VENV)/triton36/.stamp
	PYTHONPATH=$(VENV)/triton36:$(CURDIR) TRITON_INTERPRET=0 VTK_EXPECT_TRITON=$(TRITON_GPU) \
	  $(VPY) -m pytest -q -p no:cacheprovider python_tests/test_triton_compile.py

# The same check against the venv's own, newer Triton: not part of `make test` (it compiles about
# three times slower than 3.6), but it shows what an upgrade of the GPU machines would meet.
test-triton-compile-venv: build
	PYTHONPATH=$(CURDIR) TRITON_INTERPRET=0 VTK_EXPECT_TRITON=$$($(VPY) -c "import importlib.metadata as m; print(m.version('triton'))") \
	  $(VPY) -m pytest -q -p no:cacheprovider python_tests/test_triton_compile.py

test: check-nvcc check-setuptools test-cpu test-hf-old test-triton-compile

demo: build
	$(VENV)/bin/vtk demo

# GPU lane: the machine's own python3 (torch with CUDA, triton, transformers, pytest), no venv.
# tools/gpu_lane.sh OUTDIR runs every stage at once (what a short GPU session should run).
GPU_OUT ?= gpu-lane
test-gpu:
	PYTHON=$(PYTHON) tools/gpu_lane.sh --only tests $(GPU_OUT)

bench:
	PYTHON=$(PYTHON) tools/gpu_lane.sh --only bench $(GPU_OUT); rc=$$?; \
	for part in ops e2e; do f=$(GPU_OUT)/bench-$$part.json; [ -s $$f ] || continue; \
	  tag=$$($(PYTHON) -c "import json,sys,re; e=json.load(open(sys.argv[1]))['environment']; print(re.sub(r'[^A-Za-z0-9.]+','_',e['device']))" $$f); \
	  cp $$f benchmarks/results/gpu-$$tag-$$part.json && echo "benchmarks/results/gpu-$$tag-$$part.json"; \
	done; exit $$rc

# README's CPU tables: the op suite at B = 4 (LLaVA-1.5 shapes) and the end-to-end prefill.
CPU_TAG ?= cpu-$(shell nproc)core
bench-cpu: build
	$(VPY) -m pytest benchmarks/test_bench_ops.py benchmarks/test_bench_prune.py --benchmark -k "B4 and llava15" \
	  -q -p no:cacheprovider --vtk-summary benchmarks/results/$(CPU_TAG)-B4-llava15.json
	$(VPY) -m pytest benchmarks/test_bench_e2e.py --benchmark -q -p no:cacheprovider \
	  --vtk-summary benchmarks/results/$(CPU_TAG)-e2e-small.json
	$(VPY) tools/bench_table.py benchmarks/results/$(CPU_TAG)-B4-llava15.json benchmarks/results/$(CPU_TAG)-e2e-small.json
	$(VPY) tools/bench_table.py --png benchmarks/results/$(CPU_TAG)-B4-llava15.png benchmarks/results/$(CPU_TAG)-B4-llava15.json

# vLLM plugin lane. vLLM's wheel pins its own torch (a CUDA build, ~9.5 GB installed), so it
# gets a venv of its own; VLLM_TARGET_DEVICE=cpu (set by python_tests_vllm/conftest.py) lets its
# registry, processors and model classes run without a GPU.
VLLM_VERSION ?= 0.33.0
VVENV := .venv-vllm
VVPY := $(VVENV)/bin/python
VSTAMP := $(VVENV)/.deps-installed
VTK_SOURCES := setup.py pyproject.toml README.md $(shell find vtkernels csrc -type f \
  ! -name '*.so' ! -name '*.pyc' 2>/dev/null)

$(VVPY):
	$(PYTHON) -m venv $(VVENV)

$(VSTAMP): $(VVPY) Makefile
	$(VVPY) -m pip install -q --upgrade pip
	$(VVPY) -m pip install -q vllm==$(VLLM_VERSION) pytest setuptools wheel ninja
	touch $@

# vtkernels compiled against vLLM's torch (CPU kernels) and installed, not editable, from a copy
# of the sources: the in-place vtkernels/_C*.so of `make build` is .venv's torch's and must
# neither be picked up here nor be overwritten.
$(VVENV)/.vtk-installed: $(VSTAMP) $(VTK_SOURCES)
	rm -rf $(VVENV)/src && mkdir -p $(VVENV)/src
	tar -c --exclude='*.so' --exclude='__pycache__' setup.py pyproject.toml README.md csrc vtkernels \
	  | tar -x -C $(VVENV)/src
	cd $(VVENV)/src && VTK_BUILD_CUDA=0 MAX_JOBS=$(JOBS) ../bin/python -m pip install -q \
	  --no-build-isolation --no-deps --force-reinstall .
	touch $@

# -P: the repository root stays off sys.path, so the tests import the installed vtkernels.
test-vllm: $(VVENV)/.vtk-installed
	$(VVPY) -P -m pytest python_tests_vllm -q -p no:cacheprovider

clean:
	rm -rf build dist *.egg-info vtkernels/_C*.so $(VENV) $(VVENV)
