# Every target installs what it needs into .venv (created on first use), exactly as uv.lock says.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# uv itself lives in .tools/, apart from the locked .venv, at a pinned version.
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
export UV_PROJECT_ENVIRONMENT := $(VENV)
# Installs compile every module to bytecode once: each Ray worker process then imports torch,
# Ray and open_clip from .pyc instead of compiling their sources anew (about twice as fast
# to start here, where PYTHONDONTWRITEBYTECODE=1 stops Python from caching them itself).
export UV_COMPILE_BYTECODE := 1

DEMO_DATA := data/demo
DEMO_ARGS := --out $(DEMO_DATA) --num-samples 6000 --test-samples 1000 --samples-per-shard 500 --noise symmetric --rate 0.4 --seed 0

.PHONY: cluster-up cluster-down cluster-status install lock browser demo demo-data train-demo test test-fast lint format bench mutate tiny-clip clean-runs

install: $(INSTALLED)

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install -q "uv==$(UV_VERSION)"

# `uv sync --locked` installs exactly uv.lock (the project editable, plus the test extra) and
# stops with an error when pyproject.toml has changed since the lock was made: run `make lock`.
$(INSTALLED): pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked --extra test
	touch $@

# Refresh the lock on purpose (newest versions allowed by pyproject.toml), then the cluster's
# pinned requirements exported from it. Commit uv.lock and cluster/requirements.txt together.
lock: $(UV)
	$(UV) lock --upgrade
	$(UV) export --locked --no-dev --no-emit-project --format requirements-txt \
	  --output-file cluster/requirements.txt --quiet

# Debian's Chromium renders the HTML report in the report test (headless).
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { \
	  echo "installing Debian's chromium (for the report render test)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	}

demo-data: $(INSTALLED)
	$(PY) -m jobs.make_demo_data $(DEMO_ARGS)

# `clipcleaner demo`: the demo data (make_demo_data's defaults, as DEMO_ARGS) unless already
# there, then the clean job with configs/demo.yaml.
demo: $(INSTALLED)
	$(VENV)/bin/clipcleaner demo

# The training half's value on noise that hurts (hard, 40%): the clean job once, then noisy
# labels vs the CLIP clean set vs the recommended MixFix, same seed; table and accuracy
# curves in runs/train-demo/comparison.html (benchmarks.train_modes).
TRAIN_DEMO_DATA := data/demo-hard
TRAIN_DEMO_ARGS := --out $(TRAIN_DEMO_DATA) --num-samples 6000 --test-samples 1000 --samples-per-shard 500 --noise hard --rate 0.4 --seed 7

train-demo: $(INSTALLED)
	$(PY) -m jobs.make_demo_data $(TRAIN_DEMO_ARGS)
	$(PY) -m benchmarks.train_modes --data $(TRAIN_DEMO_DATA) --modes noisy,clean_only,recommended \
	  --work runs/train-demo --out runs/train-demo/comparison.json

test: $(INSTALLED) browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -q --durations=15

# The edit loop: the unit tests only (no Ray, no S3 endpoint, no browser).
test-fast: $(INSTALLED)
	$(PY) -m pytest -q -m "not integration and not e2e and not browser"

# Mutation testing of the pure central modules (docs/testing.md), not part of `make test`:
# mutmut mutates them ([tool.mutmut] in pyproject.toml), runs on each mutant the unit tests
# that call its function, and tests.mutation_score prints the score on its last line.
# Incremental: mutants/ is kept, and a rerun tests only functions changed since (`rm -rf
# mutants` starts afresh). MUTANTS names mutants (globs) to rerun, whatever their result:
#   make mutate MUTANTS='training.checkpoint.* cleaner.selection.rules.*'
MUTATE_JOBS ?= 2
MUTANTS ?=
mutate: $(INSTALLED)
	$(UV) sync --locked --extra test --extra mutate
	-$(VENV)/bin/mutmut run --max-children $(MUTATE_JOBS) $(MUTANTS)
	$(PY) -m tests.mutation_score

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(INSTALLED)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: demo
	$(UV) sync --locked --extra test --extra bench
	$(PY) -m benchmarks.throughput --input $(DEMO_DATA)/train
	$(PY) -m benchmarks.probe_modes --run runs/demo
	$(PY) -m benchmarks.train_scaling --manifest runs/demo
	$(PY) -m benchmarks.cleanlab_compare
	$(PY) -m benchmarks.selection_scale
	$(PY) -m benchmarks.memory_scale --work runs/memory_scale --json runs/memory_scale/result.json

tiny-clip: $(INSTALLED)
	$(PY) -m jobs.train_tiny_clip --num-images 40000 --epochs 16 --seed 0

# A local autoscaling cluster (Ray's fake multi-node provider: a GPU-less head, GPU workers
# from zero) with token auth, to rehearse `ray job submit` as on the production clusters.
CLUSTER_DIR ?= .cluster/local
cluster-up: $(INSTALLED)
	$(PY) cluster/local/localcluster.py up --dir $(CLUSTER_DIR)

cluster-status: $(INSTALLED)
	$(PY) cluster/local/localcluster.py status --dir $(CLUSTER_DIR)

# Stops this cluster's processes only (never `ray stop`, which stops every Ray on the machine).
cluster-down: $(INSTALLED)
	$(PY) cluster/local/localcluster.py down --dir $(CLUSTER_DIR)

clean-runs:
	rm -rf runs
