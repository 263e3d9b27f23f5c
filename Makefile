# The two commands a new machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(PY)
	$(PY) -m pip install -q -e '.[test]'

demo: install
	$(PY) -m kvgate.dev.demo --workers 2 --host 127.0.0.1 --port 8000

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
