# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow lint bench-setup clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,onnx,tensorboard]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	rm -rf logs/demo
	$(PY) recipes/demo.py

# The default suite (a few minutes on 2 cores); `make test-slow` runs the end-to-end tests CI adds.
test: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-slow: setup
	$(PY) -m pytest -m slow $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

lint: setup
	$(VENV)/bin/ruff check .

# Peers that the benchmarks measure against (not needed by the library or its tests).
bench-setup: setup
	$(PY) -m pip install --quiet pyhessian scipy
	$(PY) -m pip install --quiet --no-deps torchattacks torch_optimizer

clean:
	rm -rf $(VENV) build *.egg-info logs outputs multirun
