# The few verbs a newcomer needs. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DIGITS := $(VENV)/bin/digits
# The torch build this project is tested with; override on other machines (e.g. make setup TORCH_PINS=torch).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
ARTIFACTS ?= artifacts
DEMO_MODELS ?= mlp cnn

.DEFAULT_GOAL := help
.PHONY: help setup demo test test-slow lint format clean

help: ## list the make targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

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

clean: ## remove generated artifacts, archives and run folders (keeps .venv and the MNIST cache)
	rm -rf $(ARTIFACTS) runs samples
	find model_store -type f ! -name README.md -delete
