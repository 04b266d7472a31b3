# The verbs a person types. Each creates the virtual environment it needs (.venv) on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test_gpt2 kernels bench clean

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
# it from scratch: falling loss, val loss, a checkpoint in log_demo/ and a sample at the end, then
# the loss curves drawn into log_demo/main.png
demo: $(VENV)/.runtime
	$(PY) -m prepro.tinyshakespeare
	rm -rf log_demo
	$(PY) train_gpt2.py -e d2 -b 8 -t 64 -x 200 -l 2e-3 -u 10 -v 50 -m 16 -s 100 -g 64 -n 200 -o log_demo
	$(PY) dev/plot_logs.py log_demo -o log_demo/main.png

# on every core (pytest-xdist), a test file per worker at a time and one BLAS thread each (workers of
# several threads each would fight for the cores); then the tests that time processes, alone
test: $(VENV)/.test
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --dist loadscope -m "not serial"
	$(PY) -m pytest -q -m serial

# llm.c's test_gpt2 on OpenAI's GPT-2 124M: the weights from the Hugging Face hub (needs the network
# once; offline, GPT2_SOURCE=DIR reads a GPT-2 124M directory written by save_pretrained instead), the
# PyTorch reference's debug state on the first Tiny Shakespeare val tokens, then our model against it
# (DEVICE=cuda for the GPU and llm.c's bf16 bars). GPT2_WEIGHTS_MAKE_COMMAND: the script's failed
# download names this command, not its own --source, which a make user cannot pass
data/gpt2_124M.bin: | $(VENV)/.runtime
	GPT2_WEIGHTS_MAKE_COMMAND="make $(MAKECMDGOALS) GPT2_SOURCE=DIR" \
		$(PY) -m prepro.gpt2_weights $(if $(GPT2_SOURCE),--source "$(GPT2_SOURCE)",gpt2)

data/gpt2_124M_debug_state.bin: data/gpt2_124M.bin | $(VENV)/.test
	$(PY) -m prepro.tinyshakespeare
	$(PY) dev/torch_gpt2.py --model-in data/gpt2_124M.bin -b 4 -t 64 --steps 10 --lr 1e-4 \
		--tokens data/tinyshakespeare/tiny_shakespeare_val.bin --state-out $@

test_gpt2: data/gpt2_124M_debug_state.bin
	$(PY) dev/test_gpt2.py -e data/gpt2_124M.bin -s data/gpt2_124M_debug_state.bin --device $(or $(DEVICE),auto)

# every kernels/*.cu through nvcc for Ampere (sm_80) and Hopper (sm_90a), and through the C++
# compiler for the emulated device, warnings as errors; cached in kernels/build/, where the CUDA
# backend finds them (needs nvcc and a C++ compiler, no GPU)
kernels:
	$(PYTHON) -m kernels sm_80 sm_90a emulated

# on a GPU machine with CUDA PyTorch and requirements-gpu.txt: each kernel beside its PyTorch eager
# counterpart at GPT-2 124M shapes, then whole training steps of GPT-2 124M beside PyTorch's;
# writes dev/bench/results/kernels_<gpu>.json and train_<gpu>_d12_b16_t1024.json
bench: kernels
	$(PYTHON) dev/bench/kernels.py
	$(PYTHON) dev/bench/train.py

.PHONY: gpu-prep gpu-check
DIR ?= gpu_prep
# not OUT: a GPU machine of the device tool sets OUT in the environment, and ?= would take it
GPU_CHECK_OUT ?= log_gpu_check

# on a machine with network: fill DIR (ignored, < 60 MiB) with what an offline GPU machine needs for
# gpu-check: wheels for its Python 3.12 (nvmath-python ...), Tiny Shakespeare's shards and tokenizer
# file, and the cubins for sm_90a
gpu-prep: $(VENV)/.runtime
	$(PY) dev/gpu_check.py prep $(DIR)

# on a GPU machine, offline, with its own python3 (CUDA torch, CuPy): proves the CUDA backend is
# there, then every GPU test, the kernel bench, training steps beside PyTorch at B=16 and the
# largest B that fits, and the loss curves beside PyTorch's, each in its own time slot (under 8
# minutes in all), installing from DIR what the machine lacks; logs, records and a summary in
# GPU_CHECK_OUT. STAGES="tests parity" and TESTS="tests/test_cuda_matmul.py" rerun a part
gpu-check:
	@$(PYTHON) dev/gpu_check.py run $(GPU_CHECK_OUT) --prep $(DIR) --stages "$(STAGES)" --tests "$(TESTS)"

clean:
	rm -rf $(VENV) log_demo .pytest_cache kernels/build
