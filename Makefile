# The two commands a newcomer needs: `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
# torch is installed first, pinned. Plain pip gets the CPU build only where its config has a
# find-links or index holding the CPU wheel (as here); on Linux, PyPI's torch is the multi-GB CUDA
# build, so elsewhere run e.g. `make serve TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
TORCH_INDEX ?=

$(BIN)/lesa: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/lesa

install: $(BIN)/lesa

serve: install
	$(BIN)/lesa serve --host $(HOST) --port $(PORT)

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

.PHONY: install serve test
