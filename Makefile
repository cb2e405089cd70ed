# One entry point per chore. `make demo` and `make test` are the README's two commands: each sets
# up everything it needs on a fresh machine first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.weir-installed
DEMO_REPOSITORY := build/demo-repository

.PHONY: setup demo loop test lint format typecheck protos check-protos bench compare perf-analyzer-setup fuzz clean

setup: $(STAMP)

# torch first, pinned to the CPU build that lies on this machine's disk: a loose torch requirement
# would otherwise pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,test,bench]'
	touch $(STAMP)

demo: setup
	$(PY) examples/run_demo.py --repository $(DEMO_REPOSITORY)

# The whole MLOps loop on embedded defaults (features -> training -> canary -> drift -> retraining ->
# canary), a few minutes: examples/mlops_loop.py; the report goes to build/loop/report.html.
loop: setup
	$(PY) examples/mlops_loop.py --out build/loop

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: setup
	$(VENV)/bin/mypy

protos: setup
	$(PY) protos/generate.py

bench: setup
	$(PY) bench/latency.py

# Weir against MLServer, PyTriton (real Triton), KServe, Ray Serve and the floors: each peer in its
# own venv under .peers/ (about 1.3 GB each, built once), server and client pinned to separate CPUs.
compare: setup
	$(PY) bench/peers/setup.py
	$(PY) bench/peers/compare.py

# Optional: what Triton's perf_analyzer (bundled in the tritonclient 2.41.0 wheel) needs to run here.
perf-analyzer-setup: setup
	command -v apt-get >/dev/null && (dpkg -s libb64-0d >/dev/null 2>&1 || apt-get install -y -q libb64-0d)
	$(PY) -m pip install --quiet nvidia-cuda-runtime-cu12

# Coverage-guided fuzzing of the codec's decode path (atheris) for FUZZ_SECONDS (default 60): seeds in
# fuzz/corpus/ (committed), inputs it discovers in build/fuzz-corpus/, failures in fuzz/crashes/ (ignored).
FUZZ_SECONDS ?= 60
fuzz: setup
	$(PY) -c "import atheris" 2>/dev/null || $(PY) -m pip install --quiet -e '.[fuzz]'
	mkdir -p build/fuzz-corpus fuzz/crashes
	$(PY) fuzz/fuzz_codec.py build/fuzz-corpus fuzz/corpus -max_total_time=$(FUZZ_SECONDS) \
		-artifact_prefix=fuzz/crashes/ -rss_limit_mb=4096 -print_final_stats=1

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
