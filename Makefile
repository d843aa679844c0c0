# Two commands on a fresh machine: `make run` (set-up + the main job) and `make test` (set-up + every test).
# When ../shared exists beside the checkout, its CIFAR-10 and ResNet-50 weights are used.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
SHARED := $(abspath ../shared)

ifneq ($(wildcard $(SHARED)/data/cifar-10-batches-py),)
export CIFAR_TRANSFER_DATA ?= $(SHARED)/data
endif
ifneq ($(wildcard $(SHARED)/weights/resnet50_imagenet_v1_fp16.safetensors),)
export CIFAR_TRANSFER_WEIGHTS ?= $(SHARED)/weights/resnet50_imagenet_v1_fp16.safetensors
endif

ifneq ($(wildcard $(SHARED)/data/cifar-10h/cifar10h-probs.npy),)
export CIFAR_TRANSFER_HUMAN_LABELS ?= $(SHARED)/data/cifar-10h
endif

PRESET ?= auto

.PHONY: setup chromium postgresql imagemagick run test check lint bench bench-smoke bench-gpu-pack bench-gpu clean
# every optional group (analysis, serve, export, tune) and the test tools
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[all,dev]'
	touch $@

run: setup
	$(BIN)/cifar-transfer run --preset $(PRESET) --out runs/$(PRESET)

# The upload page is tested in Debian's Chromium, driven by Playwright (which never downloads a browser here).
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# CIFAR-10-C's motion blur is checked against ImageMagick (through Wand), as the benchmark's generator made it.
imagemagick:
	@ldconfig -p | grep -q libMagickWand || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libmagickwand-dev >/dev/null; }

# tune's multi-worker test starts a throwaway PostgreSQL cluster of its own with Debian's server binaries.
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }

# The whole suite on two pytest-xdist workers (one thread each): the 25 slowest tests are listed at the end.
test: setup chromium postgresql imagemagick lint
	$(BIN)/pytest -n 2

# The inner loop: lint and the fast tests (no training past a few seconds, no torchrun, browser or database).
check: setup lint
	$(BIN)/pytest -n 2 -m "not slow and not distributed and not browser and not database"

# Throughput, end-to-end presets and a plain reference loop side by side; prints a table, writes JSON.
bench: setup
	$(BIN)/python bench/bench.py

bench-smoke: setup
	$(BIN)/python bench/bench.py --smoke

# A lent GPU gets two uploads of at most 64 MiB (docs/performance.md): `make bench-gpu-pack` here puts the weights
# in .bench/weights/ (51 MB: first upload, copied to /root/ there) and 15,000 training + the 10,000 test images in
# .bench/data/ (~58 MB: second upload); `make bench-gpu` there runs with that machine's own Python and PyTorch.
BENCH_WEIGHTS ?= /root/resnet50_imagenet_v1_fp16.safetensors
bench-gpu-pack:
	mkdir -p .bench/weights .bench/data
	cp $(SHARED)/weights/resnet50_imagenet_v1_fp16.safetensors .bench/weights/
	python3 $(SHARED)/tools/pack_npz.py .bench/data --per-class 1500

bench-gpu:
	PYTHONPATH=src PYTHONUNBUFFERED=1 python3 bench/bench.py --device cuda --data-dir .bench/data \
		--weights $(BENCH_WEIGHTS) --json $${OUT:-runs/bench}/bench-gpu.json

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs
