# Two entry points that work on a fresh machine with only Python:
#   make demo  - build the synthetic city, train a tiny CMMPNet, evaluate, predict
#   make test  - run the test suite
# Both create .venv from the pinned requirements.txt when it is absent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test venv bench

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

DEMO := $(PY) main.py --config=configs/synthetic.py --workdir=runs/demo

demo: $(VENV)/.installed
	$(DEMO)
	$(DEMO) --mode=eval
	$(DEMO) --mode=predict

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 tests

bench: $(VENV)/.installed
	$(PY) -m benchmarks.run
