# Public targets: `make demo` and `make test`. Both install the test extra into the current
# Python environment first; choose the interpreter with `make test PYTHON=path/to/python`.
PYTHON ?= python3

.PHONY: demo test install

install:
	$(PYTHON) -m pip install -e ".[test]"

demo: install
	$(PYTHON) scripts/demo.py

# One pytest worker per core (pytest-xdist, from the test extra): the rendered projects' suites run side by
# side; worksteal hands a free worker the tests still waiting, since one suite takes minutes and a lint seconds.
test: install
	$(PYTHON) -m pytest -n auto --dist worksteal
