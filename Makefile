# The two README commands. Each creates the virtualenv .venv if needed and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch release the suite is tested with (a CPU wheel keeps the install small).
TORCH_PIN := torch==2.13.0

.PHONY: demo test test-quick bench venv

venv:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)

demo: venv
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[torch,jax]"
	$(PY) examples/demo.py

test: venv
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[torch,jax,test]"
	$(PY) -m pytest -q -p no:cacheprovider
	$(PY) -m conformance

test-quick: venv
	$(PY) -m pytest -q -m "not slow" -p no:cacheprovider

bench: venv
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[torch,jax,test,bench]"
	$(PY) benchmarks/accounting.py
	$(PY) benchmarks/torch_step.py --quick
	$(VENV)/bin/dpcore audit --trials 4000 --num-canaries 1000 --steps 50
