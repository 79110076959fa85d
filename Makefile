# Newcomer targets (see README). PYTHON may point at any Python >= 3.11.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test demo bench zoo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned: the CPU build (an unpinned torch pulls a multi-GB CUDA build); then obim with its dev extra
install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'

test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline $(BIN)/python -m pytest -q

demo: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python experiments/demo_merge.py

zoo: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/obim-zoo build --table results/toy/zoo.md

bench: install
	$(BIN)/python experiments/bench_merge.py

clean:
	rm -rf $(VENV) build *.egg-info
