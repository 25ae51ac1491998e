# Two commands set everything up on a fresh machine:
#   make run    create .venv if missing, install, serve the built-in model (configs/local.yaml)
#   make test   the same set-up, then the CPU test suite
# Both are idempotent: the install step reruns only when pyproject.toml changes.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: run test lint gpu-test bundle clean

$(STAMP): pyproject.toml
ifeq ($(HAS_GPU),1)
	@echo "GPU found: keeping this machine's torch (venv sees system site-packages)"
	test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,gpu]'
else
	@echo "No GPU: installing the CPU build of torch"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
endif
	touch $(STAMP)

run: $(STAMP)
	RAY_ADDRESS=$${RAY_ADDRESS:-local} $(BIN)/serve run configs/local.yaml

# Single-node tests share one Ray instance; the multi-node test starts its own
# cluster, so it runs in a second pytest process.
test: $(STAMP)
	$(BIN)/ruff check deployments tests benchmarks examples
	$(BIN)/python -m pytest tests/cpu -m "not multinode"
	$(BIN)/python -m pytest tests/cpu -m multinode

lint: $(STAMP)
	$(BIN)/ruff check deployments tests benchmarks examples
	$(BIN)/ruff format --check deployments tests benchmarks examples

# On the GPU machine (see shared/gpu/README.md): source .devbundle/activate.sh && make gpu-test
gpu-test:
	python3 -m pytest tests/gpu -m gpu -p no:cacheprovider

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
