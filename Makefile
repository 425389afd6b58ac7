# Quick start: `make demo` and `make test`. Both set up .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mesh-installed
UNAME_S := $(shell uname -s)

.PHONY: setup demo test test-fast bench clean model test-models

setup: $(STAMP) model

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement would pull a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

model: $(STAMP)
	$(BIN)/python -m mesh models pull smollm2-135m

# The larger models the tests run the mesh on (745 MB, once per machine, into the model cache).
test-models: $(STAMP)
	$(BIN)/python -m mesh models pull gemma-3-270m
	$(BIN)/python -m mesh models pull qwen2.5-coder-0.5b

demo: setup
	$(BIN)/python -m mesh demo

# Every test, as two lanes of pytest processes side by side (tests/lanes.py): the
# real-process tests beside the kernel checks and then the in-process meshes.
test: setup test-models
	$(BIN)/python tests/lanes.py

# The edit-run loop: everything but the slow tests (real processes, namespaces, large models).
test-fast: setup
	$(BIN)/python -m pytest -q tests -m "not slow and not netns"

bench: setup
	$(BIN)/python bench/decode.py

clean:
	rm -rf $(VENV) build *.egg-info
