# The few verbs a newcomer needs. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DIGITS := $(VENV)/bin/digits
# The torch build this project is tested with; override on other machines (e.g. make setup TORCH_PINS=torch).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
ARTIFACTS ?= artifacts
DEMO_MODELS ?= mlp cnn
BENCH_OUT ?= runs/bench
# settings of both archives of each HTTP bench; empty: `digits archive`'s defaults (batch 16, 5 ms, 1 worker,
# 1 thread), what `make demo` serves. E.g. make bench BENCH_HTTP="--workers 2"
BENCH_HTTP ?=
# the OIP step's (4 requests of 64 digits in flight): one single-thread worker per core, at most 4, each taking
# its share of the requests as a batch, so that the workers compute side by side (docs/tuning.md, Clients that
# batch). With 2 cores: --workers 2 --batch-size 2.
OIP_WORKERS ?= $(shell n=$$(nproc); [ $$n -gt 4 ] && n=4; echo $$n)
BENCH_OIP ?= --workers $(OIP_WORKERS) --batch-size $(shell echo $$((4 / $(OIP_WORKERS))))
# the report of a bench run, written whole (its plots in docs/performance/), and the README's headline from it
REPORT ?= docs/performance.md
# the runs whose serving figures join the headline table (folders of BENCH_OUT)
HEADLINE_RUNS ?= cnn-onnx-http mlp-torchscript-http cnn-onnx-oip-http cnn-onnx-oip-json-http cnn-explain-http

.DEFAULT_GOAL := help
.PHONY: help setup demo test test-slow lint format bench bench-explain clean

help: ## list the make targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## create .venv with digits installed editable, with the dev extras

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup ## the main job: train, export with parity, archive, serve, classify sample digits
	@for model in $(DEMO_MODELS); do \
	  if [ -f $(ARTIFACTS)/$$model/checkpoint.pt ]; then \
	    echo "== $$model: $(ARTIFACTS)/$$model/checkpoint.pt exists, skipping training"; \
	  else \
	    echo "== training $$model"; $(DIGITS) train $$model --out $(ARTIFACTS) || exit 1; \
	  fi; \
	done
	@for model in $(DEMO_MODELS); do \
	  echo "== exporting $$model (TorchScript, ONNX) and proving parity"; \
	  $(DIGITS) export $$model --artifacts $(ARTIFACTS) || exit 1; \
	done
	@echo "== archiving cnn (ONNX) and mlp (TorchScript) into model_store/"
	$(DIGITS) archive cnn --format onnx --artifacts $(ARTIFACTS)
	$(DIGITS) archive mlp --format torchscript --artifacts $(ARTIFACTS)
	@echo "== serving"
	@$(DIGITS) stop >/dev/null
	$(DIGITS) serve
	$(DIGITS) samples --out samples --count 5
	@echo "== cnn (ONNX) over HTTP"
	$(DIGITS) predict samples/*.png --model cnn
	@echo "== mlp (TorchScript) over HTTP"
	$(DIGITS) predict samples/*.png --model mlp
	@echo
	@echo "TorchServe keeps running. Query it yourself:"
	@echo '  curl -H "Authorization: Bearer $$($(DIGITS) token)" -T samples/test-00000_label-7.png http://127.0.0.1:8080/predictions/cnn'
	@echo "Stop it: $(DIGITS) stop"
	@echo
	@echo "Draw digits in your browser (a page on 127.0.0.1:8000 that asks these models; Ctrl-C stops it):"
	@echo "  $(DIGITS) ui"

test: setup ## run the test suite (without the slow tests)
	$(PY) -m pytest -m "not slow" tests

test-slow: setup ## run only the slow tests (soak, long end-to-end runs)
	$(PY) -m pytest -m slow tests

lint: setup ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup ## apply ruff's formatting and safe fixes
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup ## benchmarks (offline with int8 and .pt2; over HTTP: PNG, drawings, OIP binary and JSON; a rollout under load) into docs/performance.md (after make demo)
	@for model in mlp cnn; do \
	  test -f $(ARTIFACTS)/$$model/export.json || { echo "no $(ARTIFACTS)/$$model/export.json: run make demo first"; exit 1; }; \
	  { grep -q onnx-int8 $(ARTIFACTS)/$$model/export.json && grep -q '"pt2"' $(ARTIFACTS)/$$model/export.json; } || \
	    $(DIGITS) export $$model --artifacts $(ARTIFACTS) --quantize int8 --pt2 || exit 1; \
	done
	rm -rf $(BENCH_OUT)  # the report renders every run it finds there: this run's only
	$(DIGITS) bench offline cnn --artifacts $(ARTIFACTS) --out $(BENCH_OUT)/cnn-offline
	$(DIGITS) bench offline mlp --artifacts $(ARTIFACTS) --out $(BENCH_OUT)/mlp-offline
	$(DIGITS) samples --out $(BENCH_OUT)/inputs --count 1
	$(DIGITS) bench http --model cnn --format onnx --artifacts $(ARTIFACTS) $(BENCH_HTTP) \
	  --input $(BENCH_OUT)/inputs/test-00000_label-7.png --out $(BENCH_OUT)/cnn-onnx-http
	$(DIGITS) bench http --model mlp --format torchscript --artifacts $(ARTIFACTS) $(BENCH_HTTP) \
	  --input $(BENCH_OUT)/inputs/test-00000_label-7.png --out $(BENCH_OUT)/mlp-torchscript-http
	$(DIGITS) bench http --model cnn --format onnx --artifacts $(ARTIFACTS) $(BENCH_HTTP) \
	  --input $(BENCH_OUT)/inputs/drawn-00000_label-7.png --out $(BENCH_OUT)/cnn-onnx-drawn-http
	$(DIGITS) bench http --model cnn --format onnx --artifacts $(ARTIFACTS) $(BENCH_OIP) \
	  --oip 64 --encoding binary --concurrency 4 --out $(BENCH_OUT)/cnn-onnx-oip-http
	$(DIGITS) bench http --model cnn --format onnx --artifacts $(ARTIFACTS) $(BENCH_OIP) \
	  --oip 64 --encoding json --concurrency 4 --out $(BENCH_OUT)/cnn-onnx-oip-json-http
	$(DIGITS) bench switch --model cnn --format onnx --artifacts $(ARTIFACTS) --out $(BENCH_OUT)/cnn-onnx-switch
	$(MAKE) --no-print-directory -o setup bench-explain
	$(DIGITS) bench report --runs $(BENCH_OUT) --artifacts $(ARTIFACTS) --out $(REPORT) --readme README.md \
	  $(foreach run,$(HEADLINE_RUNS),--headline $(run)) \
	  --command "make bench ARTIFACTS=$(ARTIFACTS) BENCH_OUT=$(BENCH_OUT) BENCH_HTTP='$(BENCH_HTTP)' BENCH_OIP='$(BENCH_OIP)'"

bench-explain: setup ## explanations of cnn: deletion test and agreement of every format (1,000 digits), cost over HTTP
	@test -f $(ARTIFACTS)/cnn/export.json || { echo "no $(ARTIFACTS)/cnn/export.json: run make demo first"; exit 1; }
	$(DIGITS) bench explain cnn --artifacts $(ARTIFACTS) --out $(BENCH_OUT)/cnn-explain
	$(DIGITS) bench explain-http --model cnn --artifacts $(ARTIFACTS) --out $(BENCH_OUT)/cnn-explain-http

clean: ## remove generated artifacts, archives and run folders (keeps .venv and the MNIST cache)
	rm -rf $(ARTIFACTS) runs samples
	find model_store -type f ! -name README.md -delete
