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
# curvlinops asks for backpack-for-pytorch and so torchvision, which would replace the installed torch; its K-FAC
# needs neither, so it goes in without dependencies. kfac-pytorch is not on PyPI: KFAC_PYTORCH=<checkout of github.com/gpauloski/kfac-pytorch>.
KFAC_PYTORCH ?=
bench-setup: setup
	$(PY) -m pip install --quiet pyhessian scipy einops opt-einsum tqdm packaging
	$(PY) -m pip install --quiet --no-deps torchattacks torch_optimizer curvlinops-for-pytorch einconv linear_operator
	if [ -n "$(KFAC_PYTORCH)" ]; then $(PY) -m pip install --quiet --no-deps "$(KFAC_PYTORCH)"; \
	else echo "kfac-pytorch skipped: set KFAC_PYTORCH=<checkout of github.com/gpauloski/kfac-pytorch>"; fi

clean:
	rm -rf $(VENV) build *.egg-info logs outputs multirun
