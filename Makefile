# The two README commands. Each creates the virtualenv .venv if needed and installs what it needs.
# `make test` runs the tests not marked slow (`make test-all` runs them all); both build the
# docs site (mkdocs.yml) with warnings as errors, in tests/test_docs_build.py; `make docs`
# builds it into build/site.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch release the suite is tested with (a CPU wheel keeps the install small).
TORCH_PIN := torch==2.13.0

.PHONY: demo test test-all test-quick docs bench venv

venv:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)

demo: venv
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[torch,jax]"
	$(PY) examples/demo.py

test: venv
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[torch,jax,test,docs]"
	$(PY) -m pytest -q -m "not slow" -p no:cacheprovider
	$(PY) -m conformance

# Everything, the tests marked `slow` included (sweeps, full example runs, 4-process cases).
test-all: venv
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[torch,jax,test,docs]"
	$(PY) -m pytest -q -p no:cacheprovider
	$(PY) -m conformance

test-quick: venv
	$(PY) -m pytest -q -m "not slow" -p no:cacheprovider

docs: venv
	$(PY) -m pip install --quiet -e ".[docs]"
	$(PY) -m mkdocs build --strict --site-dir build/site

bench: venv
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[torch,jax,test,bench]"
	$(PY) benchmarks/accounting.py
	$(PY) benchmarks/torch_step.py --quick
	$(VENV)/bin/dpcore audit --trials 4000 --num-canaries 1000 --steps 50
