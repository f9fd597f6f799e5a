# triage-node — the README's two commands are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   := .venv
PY     := $(VENV)/bin/python
DEBS   := orthanc orthanc-dicomweb dcmtk dicom3tools chromium e2fsprogs xfsprogs
STAMP  := $(VENV)/.installed

.PHONY: help install debs venv demo test test-gpu lint typecheck unit integration bench clean engines engine-ct-head-hemorrhage engine-cxr-pneumothorax engine-ct-chest-nodule engine-mr-brain-tumor engine-mg-mass

help:
	@echo "make demo   - install, then run the whole job on the embedded defaults"
	@echo "make test   - install, then ruff, mypy and the full pytest suite"
	@echo "make bench  - benchmarks (bench/)"

install: debs venv

# Debian packages: the real Orthanc, DCMTK and dicom3tools the tests and the demo use.
debs:
	@missing=""; for p in $(DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make install: needs root to install Debian packages:$$missing" >&2; exit 1; fi; \
	  echo "apt-get install$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing >/dev/null; \
	fi

venv: $(STAMP)

# torch is pinned to the CPU build that installs from a local file; installing it first keeps
# pip from resolving a multi-GB CUDA build for monai's torch requirement.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: install
	$(PY) -m deploy.demo.run $(if $(KEEP),--keep)

lint: install
	$(VENV)/bin/ruff check .

typecheck: install
	$(VENV)/bin/mypy

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest

unit: install
	$(VENV)/bin/pytest tests/unit

# Only the tests marked `gpu` (CUDA device + TensorRT); on a CPU machine they are all skipped,
# with the reason (docs/engines.md). `make test` runs them too where a GPU exists.
test-gpu: install
	$(VENV)/bin/pytest -m gpu tests

integration: install
	$(VENV)/bin/pytest tests/integration

bench: install
	$(PY) -m bench.ingest
	$(PY) -m bench.time_to_flag
	$(PY) -m bench.backlog
	$(PY) -m bench.routing
	$(PY) -m bench.encode
	$(PY) -m bench.worklist_api
	$(PY) -m bench.detectors

# Regenerate the committed ct-head-hemorrhage engine, its finding calibration, evaluation and
# model card (about 35 min on one thread; resumes from trainers/runs/ when interrupted).
engine-ct-head-hemorrhage: install
	$(PY) -m trainers train ct-head-hemorrhage --threads 1
	$(PY) -m trainers calibrate ct-head-hemorrhage --threads 1
	$(PY) -m trainers evaluate ct-head-hemorrhage --threads 1
	$(PY) -m trainers card ct-head-hemorrhage

# Regenerate the committed cxr-pneumothorax engine, its evaluation and its model card
# (about 25 min on one thread; resumes from trainers/runs/ when interrupted).
engine-cxr-pneumothorax: install
	$(PY) -m trainers train cxr-pneumothorax --threads 1
	$(PY) -m trainers evaluate cxr-pneumothorax --threads 1
	$(PY) -m trainers card cxr-pneumothorax

# Regenerate the committed ct-chest-nodule engine, its evaluation and its model card
# (about 30 min on one thread; resumes from trainers/runs/ when interrupted).
engine-ct-chest-nodule: install
	$(PY) -m trainers train ct-chest-nodule --threads 1
	$(PY) -m trainers calibrate ct-chest-nodule --threads 1
	$(PY) -m trainers evaluate ct-chest-nodule --threads 1
	$(PY) -m trainers card ct-chest-nodule

# Regenerate the committed mr-brain-tumor engine, its evaluation and its model card
# (about 35 min on one thread; resumes from trainers/runs/ when interrupted).
engine-mr-brain-tumor: install
	$(PY) -m trainers train mr-brain-tumor --threads 1
	$(PY) -m trainers evaluate mr-brain-tumor --threads 1
	$(PY) -m trainers card mr-brain-tumor

# Regenerate the committed mg-mass engine, its evaluation and its model card
# (about 70 min on one thread; resumes from trainers/runs/ when interrupted).
engine-mg-mass: install
	$(PY) -m trainers train mg-mass --threads 1
	$(PY) -m trainers evaluate mg-mass --threads 1
	$(PY) -m trainers card mg-mass

# All five engines, one after the other (about 3.3 hours on one thread).
engines: engine-ct-head-hemorrhage engine-ct-chest-nodule engine-mr-brain-tumor \
	engine-cxr-pneumothorax engine-mg-mass

clean:
	rm -rf var/ .pytest_cache .mypy_cache .ruff_cache
