# Every target installs what it needs into .venv (created on first use).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

DEMO_DATA := data/demo
DEMO_ARGS := --out $(DEMO_DATA) --num-samples 6000 --test-samples 1000 --samples-per-shard 500 --noise symmetric --rate 0.4 --seed 0

.PHONY: install browser demo demo-data train-demo test lint format bench tiny-clip clean-runs

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# Debian's Chromium renders the HTML report in the report test (headless).
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { \
	  echo "installing Debian's chromium (for the report render test)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	}

demo-data: $(INSTALLED)
	$(PY) -m jobs.make_demo_data $(DEMO_ARGS)

demo: demo-data
	$(PY) -m jobs.clean --config configs/demo.yaml

train-demo: $(INSTALLED)
	$(PY) -m jobs.train --config configs/train-demo.yaml

test: $(INSTALLED) browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(INSTALLED)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: demo
	$(PY) -m pip install -q -e ".[test,bench]"
	$(PY) -m benchmarks.throughput --input $(DEMO_DATA)/train
	$(PY) -m benchmarks.probe_modes --run runs/demo
	$(PY) -m benchmarks.train_scaling --manifest runs/demo
	$(PY) -m benchmarks.cleanlab_compare
	$(PY) -m benchmarks.selection_scale

tiny-clip: $(INSTALLED)
	$(PY) -m jobs.train_tiny_clip --num-images 40000 --epochs 16 --seed 0

clean-runs:
	rm -rf runs
