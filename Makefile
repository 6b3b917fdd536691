# Public targets: `make demo` and `make test`. Both install the test extra into the current
# Python environment first; choose the interpreter with `make test PYTHON=path/to/python`.
PYTHON ?= python3

.PHONY: demo test install

install:
	$(PYTHON) -m pip install -e ".[test]"

demo: install
	$(PYTHON) scripts/demo.py

test: install
	$(PYTHON) -m pytest
