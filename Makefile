# Thin layer over the `bottleneck` command. Every target installs what it needs first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS ?= cpu,openvino,test,ray,jax,audit,parquet
# PyTorch (the torch backend and the Hugging Face parity tests need it). The pin finds the CPU build this machine
# keeps on disk; elsewhere pip downloads PyPI's larger CUDA build, so on a CPU box prefer
# WITH_TORCH='torch --index-url https://download.pytorch.org/whl/cpu'. WITH_TORCH= (empty) installs nothing, and
# the tests that need torch then say they were skipped.
WITH_TORCH ?= torch==2.13.0

DATA ?= data
CACHE ?= cache
RUNS ?= runs
HEAD ?= logreg
ARGS ?=

.PHONY: install torch hub hub-test browser test test-fast lint demo features train-head report bench bench-scale bench-gpu bench-audit bench-cpu bench-precision bench-shards clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

# Whether a module is installed, without importing it (importing keras_hub starts TensorFlow: seconds per target).
HAS = $(BIN)/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$(1)') is None)"

torch: $(STAMP)
	@test -z "$(WITH_TORCH)" || $(call HAS,torch) || $(BIN)/python -m pip install --quiet $(WITH_TORCH)

# Foundation-model backbones (opt-in): keras-hub without its declared dependencies (tensorflow-text would pull the
# full tensorflow beside tensorflow-cpu), plus the few its vision models import.
hub: $(STAMP)
	@$(call HAS,keras_hub) || ($(BIN)/python -m pip install --quiet -e ".[hub]" && \
	  $(BIN)/python -m pip install --quiet --no-deps "keras-hub>=0.32")

# The suite tests the foundation models too, against Hugging Face transformers' own (those tests need torch).
hub-test: hub
	@$(call HAS,transformers) || $(BIN)/python -m pip install --quiet -e ".[hub,hub-test]"

# The report test opens the page in headless Chromium; install it where it is missing (Debian, as root).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

# Two workers (the machine's two cores); a test file stays on one worker, so module fixtures are built once. The
# slowest 20 are listed at the end (tests/conftest.py starts the longest files first).
test: $(STAMP) torch hub-test browser
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=20

# The suite less its end-to-end cases marked `slow` (InceptionV3 extractions, whole demos, fine-tuning): every module
# still tested, in about two minutes on two cores.
test-fast: $(STAMP) torch hub-test browser
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow"

# ruff's lint (rules in pyproject.toml), its formatter as a check, and mypy on the package (settings in setup.cfg).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The whole transfer-learning story on scikit-learn's digits, offline (see bottleneck/demo.py).
demo: $(STAMP)
	$(BIN)/bottleneck demo --work $(CACHE)/demo --cache $(CACHE) $(ARGS)

features: $(STAMP)
	$(BIN)/bottleneck features $(DATA) --cache $(CACHE) $(ARGS)

train-head: $(STAMP)
	$(BIN)/bottleneck train-head --data $(DATA) --cache $(CACHE) --head $(HEAD) --runs $(RUNS) $(ARGS)

report: $(STAMP)
	$(BIN)/python scripts/report.py --runs $(RUNS) $(ARGS)

bench: $(STAMP)
	$(BIN)/python scripts/bench.py $(ARGS)

# How the store and the heads grow: synthetic stores of 10k, 100k and 1M rows (ARGS=--quick for a smoke test).
bench-scale: $(STAMP)
	$(BIN)/python scripts/bench_scale.py --out $(CACHE)/bench-scale $(ARGS)

# How close each CPU runtime (OpenVINO, TensorFlow, ONNX Runtime) and each OpenVINO precision comes to its limit.
bench-cpu: $(STAMP)
	$(BIN)/python scripts/bench_cpu.py --out $(CACHE)/bench-cpu $(ARGS)

# What bf16 and int8 features cost in accuracy on the demo's transfer task (float32, int8, bf16, emulated bf16).
bench-precision: $(STAMP)
	$(BIN)/python scripts/bench_precision.py --out $(CACHE)/bench-precision $(ARGS)

# `bottleneck audit` on 100,000 images (2048-d features written straight into the store): time, memory, recall.
# The same 10,000 images as files and as webdataset tar shards, end to end (ARGS=--images 1000 for a quick look).
bench-shards: $(STAMP)
	$(BIN)/python scripts/bench_shards.py --out $(CACHE)/bench-shards $(ARGS)

bench-audit: $(STAMP)
	$(BIN)/python scripts/bench_audit.py --out $(CACHE)/bench-audit $(ARGS)

# Model-only and end-to-end images/s per Keras backend, precision and batch size (on a GPU box; a CPU works, slowly:
# ARGS="--images 32 --batch-sizes 16").
bench-gpu: $(STAMP)
	$(BIN)/python scripts/bench_gpu.py --out $(CACHE)/bench-gpu $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
