# vtkernels: set-up, tests, demo and benchmarks.
#   make demo      create .venv, install, build, run `vtk demo`
#   make test      the same set-up, then every test (no GPU needed)
#   make test-gpu  GPU lane, on a machine with CUDA: builds in place with that machine's python3
#   make bench     benchmarks at real sizes (GPU when present), results under benchmarks/results/
#   make test-vllm the vLLM plugin on the CPU, in its own venv .venv-vllm (vLLM pins its own torch)
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
TF_OLD ?= 5.17.0
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-installed
JOBS ?= 2

.PHONY: all venv build test test-cpu test-hf-old check-nvcc demo test-gpu bench clean test-vllm

all: test

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(VPY) pyproject.toml Makefile
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==$(TORCH_VERSION)
	$(VPY) -m pip install -q setuptools wheel ninja numpy pillow pytest pytest-benchmark expecttest "triton>=3.6" "transformers>=5.0"
	touch $(STAMP)

venv: $(STAMP)

# Editable install, so the compiled vtkernels/_C*.so lands in the source tree.
build: $(STAMP)
	MAX_JOBS=$(JOBS) $(VPY) -m pip install -q --no-build-isolation --no-deps -e .

check-nvcc:
	tools/check_nvcc.sh

test-cpu: build
	TRITON_INTERPRET=1 $(VPY) -m pytest python_tests benchmarks -q -p no:cacheprovider

# The Hugging Face integration against the oldest supported transformers (what the GPU machines run).
$(VENV)/tf-old/.stamp: $(STAMP)
	# transformers 5.17 wants huggingface_hub < 2 (and its httpx client): kept beside it, not in the venv.
	$(VPY) -m pip install -q --no-deps --target $(VENV)/tf-old transformers==$(TF_OLD) \
	  "huggingface_hub>=1.5,<2" httpx httpcore certifi
	touch $@

test-hf-old: build $(VENV)/tf-old/.stamp
	PYTHONPATH=$(VENV)/tf-old TRITON_INTERPRET=1 $(VPY) -m pytest -q -p no:cacheprovider \
	  python_tests/test_hf.py python_tests/test_flops.py python_tests/test_cli.py

test: check-nvcc test-cpu test-hf-old

demo: build
	$(VENV)/bin/vtk demo

# GPU lane: the machine's own python3 (torch with CUDA, triton, transformers, pytest), no venv.
test-gpu:
	VTK_BUILD_CUDA=1 MAX_JOBS=8 $(PYTHON) setup.py build_ext --inplace
	PYTHONPATH=$(CURDIR) $(PYTHON) -m pytest python_tests -q -p no:cacheprovider

bench:
	VTK_BUILD_CUDA=1 MAX_JOBS=8 $(PYTHON) setup.py build_ext --inplace
	mkdir -p benchmarks/results
	PYTHONPATH=$(CURDIR) $(PYTHON) -m pytest benchmarks --benchmark -q -p no:cacheprovider \
	  --benchmark-json=benchmarks/results/bench-$$($(PYTHON) -c "import torch;print(torch.cuda.get_device_name().replace(' ','_') if torch.cuda.is_available() else 'cpu')").json

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
