# Two commands on a fresh machine (see README.md):
#   make demo   - install into .venv, then run the De-En ACR recipe on its embedded default
#   make test   - install into .venv, then run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test
install: $(VENV)/.installed

# The CPU wheel of torch first, where the machine has it, so that the torch requirement of the
# package does not pull a multi-GB CUDA build onto a CPU-only box; any torch already there is kept.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet torch==2.13.0 || $(BIN)/pip install --quiet torch
	$(BIN)/pip install --quiet -e ".[hf,test]"
	touch $@

# The launch settings spelled out (accelerate warns about each one it defaults) and -q: a failing run ends with
# the recipe's own message, not the launcher's CalledProcessError traceback.
demo: install
	$(BIN)/accelerate launch -q --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		recipes/de_en.py

test: install
	$(BIN)/python -m pytest -q
