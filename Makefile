# lqkit — set-up and main jobs. `make demo` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Torch is installed only when the venv cannot import it; bring your own by installing it into
# $(VENV) first (or override TORCH_SPEC, e.g. TORCH_SPEC="torch --index-url ...").
TORCH_SPEC ?= torch==2.13.0
# The GPU kernels' tests also run on the CPU through triton's interpreter (second step of `make test`);
# triton is installed for that only when the venv cannot import it (CUDA builds of torch ship it).
TRITON_SPEC ?= triton==3.6.0
# Worker processes (pytest-xdist) of the main step (whole test files per worker, so that a file's fixtures are
# built once) and of the interpreter step; each worker's torch takes its share of the cores (tests/conftest.py).
TEST_JOBS ?= 2
INTERPRET_JOBS ?= 2
EXTRAS ?= demo,test,plot,finetune,export

# `make test` allows a test this many seconds (set-up + call); slower ones fail (see tests/timeguard.py).
MAX_TEST_SECONDS ?= 60

.PHONY: demo test test-all test-fast venv bench peers clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed

# Compress the default model (google/gemma-3-270m) and print the result table.
demo: venv
	HF_HUB_OFFLINE=1 $(VENV)/bin/lqkit demo

# The default model is converted once (about 1.5 min from its GGUF; cached in ~/.cache/lqkit) before the
# tests, which then read the cached folder. The kernels run through triton's interpreter on a sample of
# their launch configurations (every format and layout); `make test-all` runs all of them (docs/testing.md):
# run it before touching the kernels, and on a GPU machine, where they run natively.
test: venv
	HF_HUB_OFFLINE=1 $(PY) -c "from lqkit.models import default_model_dir; default_model_dir()"
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile --durations=15 \
		--max-test-seconds $(MAX_TEST_SECONDS)
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "$(TRITON_SPEC)"
	LQKIT_TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n $(INTERPRET_JOBS) -m "not exhaustive" \
		--durations=10 --max-test-seconds $(MAX_TEST_SECONDS) tests/test_kernels.py

test-all: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile --durations=15
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "$(TRITON_SPEC)"
	LQKIT_TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n $(INTERPRET_JOBS) --durations=10 tests/test_kernels.py

test-fast: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

bench: venv
	HF_HUB_OFFLINE=1 $(PY) bench/quality.py

# Existing quantization tools (HQQ, GPTQModel, peft NF/LoftQ, bitsandbytes) side by side with lqkit's
# RTN, in their own venv. Torch is installed only when missing and then pinned to the installed version, so
# that no peer package can replace it (GPTQModel's newest release would pull a newer torch).
PEERS_VENV ?= .venv-peers
PEERS_PY := $(PEERS_VENV)/bin/python

$(PEERS_VENV)/.installed: pyproject.toml
	test -x $(PEERS_PY) || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -c "import torch" 2>/dev/null || $(PEERS_PY) -m pip install -q "$(TORCH_SPEC)"
	$(PEERS_PY) -m pip install -q -e ".[demo,plot,peers]" \
		"torch==$$($(PEERS_PY) -c 'import torch; print(torch.__version__.split("+")[0])')"
	touch $@

peers: $(PEERS_VENV)/.installed
	HF_HUB_OFFLINE=1 $(PEERS_PY) bench/peers.py

clean:
	rm -rf $(VENV) $(PEERS_VENV) build dist src/*.egg-info out
