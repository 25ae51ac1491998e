# Two commands set everything up on a fresh machine:
#   make run    create .venv if missing, install, serve the built-in model (configs/local.yaml)
#   make test   the same set-up, then make lint (ruff check + format check), then the CPU
#               test suite
# Both are idempotent: the install step reruns only when pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

# pyproject.toml's requires-python (rmm has no wheels for older Pythons); a test keeps them equal.
MIN_PYTHON := 3.11
# The torch the CPU install and the Dockerfile pin; PyTorch's CPU wheels come from its own
# index when it answers (scripts/torch_index.py), else from pip's configured index.
TORCH_VERSION   := 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

# make run: a local Ray head on fixed ports that a second terminal can attach to (README).
RAY_PORT       ?= 6379
DASHBOARD_PORT ?= 8265
METRICS_PORT   ?= 8080

.PHONY: run test lint check-aarch64 gpu-test bundle clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(if $(HAS_GPU),--system-site-packages) $(VENV)
	@$(BIN)/python -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if v >= tuple(map(int, "$(MIN_PYTHON)".split("."))) else f"grace-serve needs Python $(MIN_PYTHON) or newer; $(VENV) has {v[0]}.{v[1]}: rm -rf $(VENV) and run make PYTHON=python$(MIN_PYTHON)")'
	$(BIN)/python -m pip install -q --upgrade pip
ifeq ($(HAS_GPU),1)
	@echo "GPU found: keeping this machine's torch (venv sees system site-packages)"
	$(BIN)/python -m pip install -q -e '.[test,gpu]'
else
	@echo "No GPU: installing the CPU build of torch $(TORCH_VERSION)"
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION) $$($(BIN)/python scripts/torch_index.py $(TORCH_CPU_INDEX))
	$(BIN)/python -m pip install -q -e '.[test]'
endif
	touch $(STAMP)

# RAY_ADDRESS set: deploy into that cluster instead of starting a head.
run: $(STAMP)
	$(BIN)/python -m deployments.launch configs/local.yaml --ray-port $(RAY_PORT) \
		--dashboard-port $(DASHBOARD_PORT) --metrics-port $(METRICS_PORT)

# Single-node tests share one Ray instance; the multi-node test starts its own
# cluster, so it runs in a second pytest process.
test: lint
	$(BIN)/python -m pytest tests/cpu -m "not multinode"
	$(BIN)/python -m pytest tests/cpu -m multinode

lint: $(STAMP)
	$(BIN)/ruff check deployments tests benchmarks examples scripts
	$(BIN)/ruff format --check deployments tests benchmarks examples scripts

# What a GH200 / GB200 node would install (manylinux aarch64, CPython 3.11): resolved, wheels
# only, not installed (scripts/check_wheels.py).
check-aarch64: $(STAMP)
	$(BIN)/python scripts/check_wheels.py --arch aarch64 --python $(MIN_PYTHON) --torch $(TORCH_VERSION)

# On the GPU machine (see shared/gpu/README.md): source .devbundle/activate.sh && make gpu-test
gpu-test:
	python3 -m pytest tests/gpu -m gpu -p no:cacheprovider

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
