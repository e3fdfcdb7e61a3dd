# lqkit — set-up and main jobs. `make demo` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Torch is installed only when the venv cannot import it; bring your own by installing it into
# $(VENV) first (or override TORCH_SPEC, e.g. TORCH_SPEC="torch --index-url ...").
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= demo,test,plot

.PHONY: demo test test-fast venv bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed

# Compress the default model (google/gemma-3-270m) and print the result table.
demo: venv
	HF_HUB_OFFLINE=1 $(VENV)/bin/lqkit demo

test: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

bench: venv
	HF_HUB_OFFLINE=1 $(PY) bench/quality.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info out
