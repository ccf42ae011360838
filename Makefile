# `make test` and `make run` create .venv on first use. torch is installed first from TORCH_SPEC
# (default: the CPU wheel torch==2.13.0) so that a CPU machine never pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
ARGS ?=

.PHONY: install test run clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

test: install
	$(BIN)/python -m pytest -q

run: install
	$(BIN)/pyro-vits fit $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

# The KL-estimator study's documentation numbers and figures (docs/results.json, docs/figures/*.png,
# docs/tables/*.md, docs/kl_estimators.md rendered from docs/kl_estimators.template.md). CPU, reproducible.
.PHONY: docs
docs: install
	$(BIN)/python examples/compare_kl_estimators.py --preset docs --device cpu --out runs/kl-study-docs --docs docs

# docs/api.md from the docstrings (tests/test_architecture.py fails when the committed page is stale).
.PHONY: docs-api
docs-api: install
	$(BIN)/python scripts/gen_api.py
