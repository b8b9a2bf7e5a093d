# The two commands of the README. Each one does all set-up on a fresh machine first.
# A machine that already has torch (a CUDA build on a GPU box, say) keeps it; otherwise the CPU build is installed.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: setup demo test

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	@$(PIP) install -q "setuptools>=70"
	@$(PIP) install -q --no-build-isolation -e ".[test]"

demo: setup
	$(PYTHON) -m convret demo

test: setup
	$(PYTHON) -m pytest -q tests
