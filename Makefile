# Two commands on a fresh machine (see README.md):
#   make demo   - install into .venv, then run the De-En ACR recipe on its embedded default
#   make test   - install into .venv, then run the test suite
# and, for CI after `make test`:
#   make test-oldest - the Trainer, PEFT and recipe tests against the oldest releases pyproject.toml accepts
#   make test-quant  - the torchao cross-check of the fault models, in an environment of its own (an installed
#                      torchao makes every transformers import print load errors, and breaks the oldest peft)
# and `make docs` builds the documentation site (mkdocs.yml) into site/, as tests/test_docs.py does.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-oldest test-quant docs
install: $(VENV)/.installed

# The CPU wheel of torch first, where the machine has it, so that the torch requirement of the
# package does not pull a multi-GB CUDA build onto a CPU-only box; any torch already there is kept.
# lab/ (the experiments' and benchmarks' package, lab/pyproject.toml) is installed beside it, never in its wheel.
$(VENV)/.installed: pyproject.toml lab/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet torch==2.13.0 || $(BIN)/pip install --quiet torch
	$(BIN)/pip install --quiet -e ".[hf,test,docs,trl]"
	$(BIN)/pip install --quiet -e ./lab
	touch $@

# The launch settings spelled out (accelerate warns about each one it defaults) and -q: a failing run ends with
# the recipe's own message, not the launcher's CalledProcessError traceback.
demo: install
	$(BIN)/accelerate launch -q --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		recipes/de_en.py

test: install
	$(BIN)/python -m pytest -q

# The documentation site into site/ (offline; strict: a broken link or cross-reference fails the build).
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The lower bounds of transformers, accelerate and peft in pyproject.toml, in a second environment (.venv has the
# newest).  accelerate < 1.3 breaks transformers 5.0's Trainer; peft < 0.18 does not import with transformers 5.
OLDEST := transformers==5.0.0 accelerate==1.3.0 peft==0.18.0
OLDEST_VENV := .venv-oldest

$(OLDEST_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install --quiet torch==2.13.0 || $(OLDEST_VENV)/bin/pip install --quiet torch
	$(OLDEST_VENV)/bin/pip install --quiet -e ".[hf,test]" $(OLDEST)
	touch $@

test-oldest: $(OLDEST_VENV)/.installed
	$(OLDEST_VENV)/bin/python -m pytest -q tests/test_hf_callback.py tests/test_peft.py tests/test_recipes.py

QUANT_VENV := .venv-quant

$(QUANT_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(QUANT_VENV)
	$(QUANT_VENV)/bin/pip install --quiet torch==2.13.0 || $(QUANT_VENV)/bin/pip install --quiet torch
	$(QUANT_VENV)/bin/pip install --quiet -e ".[test,quant]"
	touch $@

test-quant: $(QUANT_VENV)/.installed
	$(QUANT_VENV)/bin/python -m pytest -q tests/test_faults.py tests/test_fault_sets.py -k torchao
