# pdserve developer commands. `make demo` and `make test` are the two a newcomer needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PDSERVE := $(VENV)/bin/pdserve
export UCX_WARN_UNUSED_ENV_VARS := n
export PYTHONUNBUFFERED := 1

.PHONY: install test test-fast demo proto bench clean config-docs dashboards demo-multihost gpu-check

install: $(VENV)/.installed  ## create .venv and install pdserve with the test and mooncake extras (quick when nothing changed)

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,mooncake]'
	-$(PY) -m pdserve.engine.kernels  # build the C++ CPU kernels once (cached; falls back if they cannot)
	@touch $@

test: install  ## the whole suite
	$(PY) -m pytest -q -rs

test-fast: install  ## unit tests only
	$(PY) -m pytest -q tests/unit

gpu-check: install  ## on a machine with a GPU: install the gpu extra (cupy) and run tests/gpu, showing the GB/s it measures
	$(PY) -m pip install -q -e '.[test,mooncake,gpu]'
	$(PY) -m pytest -q -rs -s tests/gpu

proto: install  ## regenerate the protobuf/gRPC code in proto/
	$(PY) -m pdserve.proto.generate

demo: install  ## make the built-in model and stream generations from it
	$(PY) -m pdserve.demo

bench: install  ## engine throughput benchmark
	$(PY) benchmarks/engine_throughput.py

config-docs: install  ## regenerate docs/configuration.md (and README.md's marked table) from the config dataclasses
	$(PY) -m pdserve.config_docs

dashboards: install  ## regenerate the Grafana dashboard JSON, its k8s ConfigMap and docs/dashboards.md (pdserve/dashboards.py)
	$(PY) -m pdserve.dashboards

demo-multihost: install  ## router and workers in their own network namespaces (needs root and iproute2)
	$(PY) deploy/netns/netns_demo.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
