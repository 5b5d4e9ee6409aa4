# Two set-up commands (README): `make figures` runs the pipeline, `make test` runs the tests.
# Both create .venv on first use and reinstall only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= organism
SMOKE ?= 0

.PHONY: help install test test-slow figures organism clean-runs paper bench check-html

help:
	@echo "make figures   run notebooks/NN_*.ipynb in order (papermill); figures/ and results/ are rewritten"
	@echo "               CONFIG=paper-7b, paper-1.5b, hub:BASE->TARGET or path/to/pair.json: a real pair, into runs/<config>/"
	@echo "make test      run the test suite (fast; CI runs this)"
	@echo "make test-slow run the slow tests too (full-size organism build, notebook execution)"
	@echo "make organism  build (or load from cache) the model-organism pair only"
	@echo "make paper     build paper/README.md from results/*.json and figures/"
	@echo "make bench     speed benchmarks: training step and generation, each against plain PyTorch"
	@echo "make check-html render the autointerp feature page in headless chromium (apt-get install chromium)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned, so that nothing resolves to a multi-GB CUDA build on a CPU machine
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

figures: $(STAMP)
	$(PY) -m tdlib.pipeline --config $(CONFIG) --smoke $(SMOKE)

organism: $(STAMP)
	$(PY) -m tdlib.organism --config $(CONFIG)

paper: $(STAMP)
	$(PY) paper/build.py

bench: $(STAMP)
	$(PY) scripts/bench_train.py --config $(CONFIG)
	$(PY) scripts/bench_generate.py --config $(CONFIG)

check-html: $(STAMP)
	$(PY) scripts/check_feature_page.py figures/04_features.html

clean-runs:
	rm -rf runs/
