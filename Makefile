# Two entry points that work on a fresh machine with only Python:
#   make demo  - build the synthetic city, train a tiny CMMPNet, evaluate, predict
#   make test  - run the test suite
# Both create .venv from the pinned requirements.txt when it is absent, as does
#   make test-fast - the quick inner loop: the suite without the tests marked slow (end-to-end
#                training, subprocess jobs, every model's forward and backward), about 70 s on a
#                2-core CPU. Its XLA compilation cache is kept across runs (in
#                /tmp/cmmp-jax-test-fast-cache; delete it to reclaim the space), so a rerun takes
#                under a minute. `make test` (what CI runs) runs everything, from an empty cache.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast venv bench

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

test-fast: $(VENV)/.installed
	JAX_COMPILATION_CACHE_DIR=$${JAX_COMPILATION_CACHE_DIR:-$${TMPDIR:-/tmp}/cmmp-jax-test-fast-cache} \
	  $(PY) -m pytest -q -n 2 -m "not slow" tests

bench: $(VENV)/.installed
	$(PY) -m benchmarks.run
