# vtkernels: set-up, tests, demo and benchmarks.
#   make demo      create .venv, install, build, run `vtk demo`
#   make test      the same set-up, then every test (no GPU needed)
#   make test-triton-compile  every Triton kernel compiled for sm_80/sm_90 (no GPU needed)
#   make test-gpu  GPU lane, on a machine with CUDA: builds in place with that machine's python3
#   make bench     benchmarks at real sizes (GPU when present), results under benchmarks/results/
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
TF_OLD ?= 5.17.0
# The Triton the GPU machines run (the venv has a newer one).
TRITON_GPU ?= 3.6.0
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-installed
JOBS ?= 2

.PHONY: all venv build test test-cpu test-hf-old test-triton-compile test-triton-compile-venv check-nvcc demo test-gpu bench clean

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
	  python_tests/test_hf.py python_tests/test_flops.py python_tests/test_cli.py

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

test: check-nvcc test-cpu test-hf-old test-triton-compile

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

clean:
	rm -rf build dist *.egg-info vtkernels/_C*.so $(VENV)
