# make run / make test: create .venv and install everything when needed, then run.
VENV    ?= .venv
PY      := $(VENV)/bin/python
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.evofast-installed
SOURCES := setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

.PHONY: install run test bench clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

# The main job: the small model trained here (evofast/data/models/addition) answers held-out
# 2-digit additions with EvoToken decoding, says which are right and writes the trace page;
# then the kernel benchmark at a small shape (random logits), ending in a one-line summary.
run: install
	$(VENV)/bin/evofast showcase --trace evotoken-trace.html
	$(VENV)/bin/evofast bench ops --shape tiny

test: install
	$(PY) -m pytest -q tests

bench: install
	$(VENV)/bin/evofast bench ops --json benchmarks/results/ops-$$(hostname).json

clean:
	rm -rf build *.egg-info evofast/*.so
