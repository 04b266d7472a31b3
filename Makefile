# The verbs a person types. Each creates the virtual environment it needs (.venv) on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test clean

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

# a fresh 4-layer GPT-2 learns one fixed batch on the NumPy backend, then saves its checkpoint
demo: $(VENV)/.runtime
	$(PY) train_gpt2.py -e d4 -b 4 -t 64 -x 30 -l 1e-3 -o log_demo

test: $(VENV)/.test
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) log_demo .pytest_cache
