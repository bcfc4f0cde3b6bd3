# Set-up on a fresh machine with only Python and pip: everything goes into .venv.
# torch's CPU build is installed first: a bare `torch` requirement with no torch present pulls a multi-GB CUDA build.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test quickstart clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

test: setup
	$(BIN)/python -m pytest -q

quickstart: setup
	$(BIN)/prefixdpo quickstart

clean:
	rm -rf $(VENV) outputs .pytest_cache
