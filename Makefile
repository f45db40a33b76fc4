# ImageGem pipeline — every command a person or CI runs.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
UV_VERSION := 0.13.9
# uv does not read pip's configuration: hand it the extra indexes this machine's pip uses.
PIP_EXTRA_INDEX := $(shell $(PYTHON) -m pip config get global.extra-index-url 2>/dev/null)
UV := $(if $(PIP_EXTRA_INDEX),UV_EXTRA_INDEX_URL="$(PIP_EXTRA_INDEX)") $(BIN)/uv
UV_FLAGS := --python $(BIN)/python --index-strategy unsafe-best-match
export IMAGEGEM_HOME ?= $(CURDIR)/data
# The Dagster instance is this folder: ./dagster.yaml keeps runs and logs under .dagster/.
export DAGSTER_HOME  ?= $(CURDIR)

.PHONY: demo test ui bench bench-crawl bench-embed bench-clusters bench-reward gpu-check fake-civitai lint install lock clean

# Installs exactly the locked set (requirements.lock, made by `make lock` from pyproject.toml)
# with uv: no resolution at install time, parallel downloads. Bytecode is compiled at install
# (as pip does by default; uv does not): where PYTHONDONTWRITEBYTECODE is set, every process
# would otherwise compile Dagster and its dependencies again, about 4 s per start.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet uv==$(UV_VERSION)
	$(UV) pip sync --quiet --compile-bytecode $(UV_FLAGS) requirements.lock
	$(UV) pip install --quiet $(UV_FLAGS) --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

## lock: re-resolve pyproject.toml (with the dev extra) into requirements.lock
lock:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet uv==$(UV_VERSION)
	$(UV) pip compile --quiet --index-strategy unsafe-best-match --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --extra dev --no-header \
		-o requirements.lock pyproject.toml

## demo: generate the sample, serve it as a local fake Civitai, run every asset, print SQL answers
demo: $(STAMP)
	$(BIN)/imagegem demo

## test: the whole test suite (CI runs this)
test: $(STAMP)
	$(BIN)/pytest -q

## ui: the Dagster UI over the demo's world: same data, same instance, the fake Civitai alongside
ui: $(STAMP)
	$(BIN)/imagegem ui

## bench: full-scale ingest + clean + catalog (generates the full-scale sample once)
bench: $(STAMP)
	$(BIN)/imagegem bench --work bench/out

## bench-embed: images/s of the image_embeddings path vs a bare model loop (3 runs, median)
bench-embed: $(STAMP)
	$(BIN)/python -m pipelines.bench_embed

## bench-clusters: the prompt-clustering scaling path at 2.9M x 1024 synthetic vectors
bench-clusters: $(STAMP)
	$(BIN)/python -m pipelines.bench_clusters

## bench-reward: the reward model at ImageGem scale (4.9M x 1024 image vectors, 2.9M prompts; 3 runs)
bench-reward: $(STAMP)
	$(BIN)/python -m pipelines.bench_reward --runs 3

## gpu-check: on a CUDA machine: ViT-H-14 embedding (images/s vs a bare loop) and Diffusion-DPO steps on an SD 1.5-size UNet (s/step), random init, bf16, peak memory
gpu-check: $(STAMP)
	$(BIN)/python -m pipelines.gpu_check

## bench-crawl: crawl the local fake Civitai at R = 20 and 100 requests/s; achieved rate, duplicates
bench-crawl: $(STAMP)
	$(BIN)/python -m pipelines.civitai.bench

## fake-civitai: serve the generated sample through the Civitai API v1 on 127.0.0.1:8765
fake-civitai: $(STAMP)
	$(BIN)/imagegem sample --out data/sources/sample
	$(BIN)/imagegem fake-civitai --data data/sources/sample --port 8765

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf data .dagster bench/out bench/embed logs .logs_queue .nux
