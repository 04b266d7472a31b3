# The verbs a person types. Each creates the virtual environment it needs (.venv) on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test kernels bench clean

# runtime dependencies only: what train_gpt2.py needs on a machine without a GPU
$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# plus the PyTorch reference and pytest
$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

setup: $(VENV)/.runtime

# Tiny Shakespeare (built offline when the web is out of reach), then a fresh 2-layer GPT-2 trained on
# it from scratch: falling loss, val loss, a checkpoint in log_demo/ and a sample at the end
demo: $(VENV)/.runtime
	$(PY) -m prepro.tinyshakespeare
	rm -rf log_demo
	$(PY) train_gpt2.py -e d2 -b 8 -t 64 -x 200 -l 2e-3 -u 10 -v 50 -m 16 -s 100 -g 64 -n 200 -o log_demo

test: $(VENV)/.test
	$(PY) -m pytest -q

# every kernels/*.cu through nvcc for Ampere (sm_80) and Hopper (sm_90a), warnings as errors; the
# cubins are cached in kernels/build/, where the CUDA backend finds them (needs nvcc, no GPU)
kernels:
	$(PYTHON) -m kernels sm_80 sm_90a

# on a GPU machine with CUDA PyTorch and requirements-gpu.txt: each kernel beside its PyTorch
# counterpart at GPT-2 124M shapes, then whole training steps of GPT-2 124M beside PyTorch's;
# writes dev/bench/results/kernels_<gpu>.json and train_<gpu>_d12_b16_t1024.json
bench: kernels
	$(PYTHON) dev/bench/kernels.py
	$(PYTHON) dev/bench/train.py

clean:
	rm -rf $(VENV) log_demo .pytest_cache kernels/build
